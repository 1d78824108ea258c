"""What many test files share: tiny configs that train in a fraction of a second on one core."""

from __future__ import annotations

import signal

# A suite started in the background by a non-interactive shell (`make test &`) inherits SIGINT ignored, and every
# command it starts would keep it ignored (Python leaves an inherited SIG_IGN alone, as nohup asks), so the tests
# that press Ctrl-C on a command would wait for nothing. Ctrl-C as in a terminal, for this process and, through
# exec's reset to the default, for every process it starts.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def tiny_overrides(*extra: str, size: int = 8, width: int = 8, decoder_width: int | None = None,
                   per_class: int = 20, k: int = 2) -> list[str]:
    """``--set`` items for a tiny synthetic-image config: one block on each side, patch 4, two classes.

    ``extra`` items come last, so they win over the base ones."""
    return [
        "data.name=synthetic", "data.synthetic.classes=2", f"data.synthetic.per_class={per_class}",
        "data.augment=false", f"model.img_size={size}", "model.patch_size=4", f"model.embed_dim={width}",
        "model.depth=1", "model.num_heads=2", f"model.decoder_dim={decoder_width or width}", "model.decoder_depth=1",
        "model.decoder_heads=2", "optim.batch_size=8", "optim.warmup_epochs=1", "noise.dim=4", f"cimle.k={k}",
        "mask.ratio=0.5", *extra,
    ]


def one_error_line(capsys, code, *words):
    """The call failed with status 2 and exactly one stderr line ``error: ...`` holding ``words``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def as_sets(items: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]`` (a command line's overrides)."""
    return [arg for item in items for arg in ("--set", item)]


def make_image_folder(root, classes: int = 3, per_class: int = 6, seed: int = 0, fmt: str = "JPEG"):
    """``root/<class>/<i>.JPEG``: images of varied sizes (20-60 px a side) whose colour depends on the class."""
    import numpy as np
    from PIL import Image
    from pathlib import Path

    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 61, size=2))
            base = np.zeros((h, w, 3)) + 255 * (np.arange(3) == c % 3)
            pixels = np.clip(0.6 * base + 0.4 * rng.uniform(0, 255, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{fmt}")
    return root


def make_train_val_folders(root, classes: int, per_class: int, val_per_class: int):
    """``root/train`` and ``root/val`` image folders with the same classes (val drawn with another seed)."""
    from pathlib import Path

    root = Path(root)
    make_image_folder(root / "train", classes=classes, per_class=per_class)
    make_image_folder(root / "val", classes=classes, per_class=val_per_class, seed=1)
    return root


def image_folder_config(root, *extra: str):
    """A tiny RGB config on the image folder at ``root`` (16 px, patch 4); ``extra`` overrides win."""
    from study.config import load_config

    return load_config(None, [
        "data.name=imagefolder", f"data.root={root}", "model.img_size=16", "model.patch_size=4", "model.in_chans=3",
        "model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2", "optim.batch_size=8", "optim.warmup_epochs=1", "epochs=2", "noise.dim=4",
        "cimle.k=2", *extra])


# The parameter cell papermill fills in, as in notebooks/run.py: the head of every stand-in run notebook.
SWEEP_PARAMETERS = """\
# %% tags=["parameters"]
config = ""
overrides = []
out = ""
results = ""
protocols = ""
sweep = ""
point = ""

"""
