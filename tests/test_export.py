"""Export to timm and transformers: the exported models give the package's features, read back from disk."""

import json

import pytest
import timm
import torch

from conftest import as_sets
from study.cli import main
from study.config import config_to_dict, load_config
from study.evaluation.export import ExportError, export, timm_architecture, verify_export
from study.methods.model import build_model
from study.models import ViTEncoder, load_pretrained_encoder, sincos_2d

ARCH = ["model.img_size=8", "model.patch_size=4", "model.embed_dim=16", "model.depth=2", "model.num_heads=2"]
TINY = ["data.name=synthetic", "data.synthetic.classes=3", "data.synthetic.per_class=20", *ARCH,
        "model.decoder_dim=8", "model.decoder_depth=1", "model.decoder_heads=2", "mask.ratio=0.5", "noise.dim=4",
        "objective=cimle"]
SETS = as_sets(TINY)
ATOL = 1e-5


@pytest.fixture
def study_checkpoint(tmp_path):
    """A cIMLE pretraining model with non-trivial weights, saved as this project's checkpoint."""
    cfg = load_config(None, TINY)
    torch.manual_seed(3)
    model = build_model(cfg)
    with torch.no_grad():  # norms and biases off their init, so a swapped or dropped one shows
        for name, p in model.encoder.named_parameters():
            if p.requires_grad and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 4}, path)
    return model.encoder.eval(), path


def _images(seed=0, batch=5):
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _close(a, b):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=ATOL, rtol=0), (a - b).abs().max().item()


def _load_timm_by_hand(folder):
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return model.eval()


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_timm_export_gives_the_package_features(study_checkpoint, tmp_path, pool):
    encoder, ckpt = study_checkpoint
    out = tmp_path / "timm"
    export(ckpt, "timm", out, pool=pool, verify=False)
    imgs = _images()
    with torch.no_grad():
        model = _load_timm_by_hand(out)
        assert model.num_classes == 0
        _close(model(imgs), encoder.features(imgs, pool))
        tokens = model.forward_features(imgs)
        _close(tokens[:, 0], encoder.features(imgs, "cls"))
        _close(tokens[:, 1:].mean(1), encoder.features(imgs, "mean"))
        if "local-dir" in getattr(timm.models._factory, "_MODEL_SOURCES", ()):  # timm >= 1.0.16 reads its folders
            hub = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
            _close(hub(imgs), encoder.features(imgs, pool))


def test_transformers_export_gives_the_package_features(study_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")

    encoder, ckpt = study_checkpoint
    out = tmp_path / "hf"
    export(ckpt, "transformers", out, verify=False)
    model, info = transformers.ViTModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.layer_norm_eps == 1e-6
    imgs = _images(1)
    with torch.no_grad():
        res = model.eval()(pixel_values=imgs)
        _close(res.last_hidden_state[:, 0], encoder.features(imgs, "cls"))
        _close(res.last_hidden_state[:, 1:].mean(1), encoder.features(imgs, "mean"))
        _close(res.pooler_output, encoder.features(imgs, "cls"))


def _facebook_pth(tmp_path, **vit_kwargs):
    """A published-MAE-style .pth: a timm ViT encoder (fixed sin-cos table) plus decoder keys."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=0, embed_dim=16, depth=2,
                            num_heads=2, qkv_bias=True, **vit_kwargs)
    sd = dict(vit.state_dict())
    if "pos_embed" in sd and sd["pos_embed"].shape[1] == 5:
        sd["pos_embed"] = sincos_2d(16, 2, cls_token=True)[None]
    sd["decoder_embed.weight"] = torch.randn(8, 16)
    sd["mask_token"] = torch.randn(1, 1, 8)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": sd, "epoch": 799}, path)
    return path


@pytest.mark.parametrize("fmt", ["timm", "transformers"])
def test_facebookresearch_pth_exports_through_the_cli(tmp_path, fmt, capsys):
    if fmt == "transformers":
        pytest.importorskip("transformers")
    pth = _facebook_pth(tmp_path)
    ours = ViTEncoder(8, 4, 1, 16, 2, 2).eval()
    load_pretrained_encoder(ours, pth)
    out = tmp_path / fmt
    assert main(["export", "--checkpoint", str(pth), "--format", fmt, "--out", str(out), "--pool", "mean",
                 *SETS]) == 0
    assert "read back" in capsys.readouterr().out
    diffs = verify_export(ours, fmt, out, pool="mean", batch=4, seed=7)
    assert set(diffs) >= {"cls", "mean"} and max(diffs.values()) <= ATOL, diffs


def test_a_changed_export_is_caught(study_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    encoder, ckpt = study_checkpoint
    out = tmp_path / "timm"
    assert max(export(ckpt, "timm", out).values()) <= ATOL
    sd = load_file(out / "model.safetensors")
    sd["norm.bias"] = sd["norm.bias"] + 0.01  # the final norm feeds every feature
    save_file(sd, out / "model.safetensors")
    assert min(verify_export(encoder, "timm", out).values()) > 1e-3


def test_architectures_without_an_equivalent_are_refused(tmp_path, capsys):
    pth = _facebook_pth(tmp_path, init_values=1e-5)  # LayerScale: neither ViTModel nor our encoder has it
    out = tmp_path / "ls"
    assert main(["export", "--checkpoint", str(pth), "--format", "timm", "--out", str(out), *SETS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "blocks.0.ls1.gamma" in err and "plain ViT" in err
    assert not out.exists()


def test_bad_requests_are_one_line_errors(study_checkpoint, tmp_path, capsys):
    _, ckpt = study_checkpoint
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "timm", "--out", str(tmp_path / "notes")]) == 2
    assert "holds files and no export" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--format", "timm",
                 "--out", str(tmp_path / "x")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    with pytest.raises(ExportError, match="format must be one of"):
        export(ckpt, "onnx", tmp_path / "y")


def test_standard_sizes_get_timm_names():
    vit_t = load_config("experiments/configs/in100-vit-t.yaml")
    vit_b = load_config("experiments/configs/in1k-vit-b.yaml")
    assert timm_architecture(vit_t) == "vit_tiny_patch16_224"
    assert timm_architecture(vit_b) == "vit_base_patch16_224"


def _saved(tmp_path, overrides):
    cfg = load_config(None, overrides)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg), "epoch": 1}, path)
    return cfg, path


SMALL = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.decoder_dim=8", "model.decoder_depth=1",
         "model.decoder_heads=2", "noise.dim=4"]


@pytest.mark.parametrize("size,patch", [(32, 8), (224, 16)])
def test_timm_preprocessing_of_an_export_is_the_package_eval_transform(tmp_path, size, patch):
    """timm's own data config and transform, read from the export, give the tensors the package evaluated on."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from study.data.image_folders import eval_transform

    cfg, ckpt = _saved(tmp_path, ["data.name=imagefolder", "data.root=unused", f"model.img_size={size}",
                                  f"model.patch_size={patch}", "model.in_chans=3", *SMALL])
    export(ckpt, "timm", tmp_path / "timm")
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    theirs = create_transform(**resolve_data_config({}, model=model))
    ours = eval_transform(size)
    rng = np.random.default_rng(0)
    for h, w in [(300, 400), (500, 333), (size + 5, size + 40), (size, size)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        a, b = ours(img), theirs(img)
        assert a.shape == b.shape and (a - b).abs().max() < 1e-6, (h, w, (a - b).abs().max())


def test_timm_preprocessing_of_a_digits_export_is_the_package_eval_transform(tmp_path):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from study.data.datasets import build_eval_datasets

    cfg, ckpt = _saved(tmp_path, ["data.name=mnist", "model.img_size=28", "model.patch_size=7", "model.in_chans=1",
                                  *SMALL])
    export(ckpt, "timm", tmp_path / "timm")
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    theirs = create_transform(**resolve_data_config({}, model=model))
    _, val = build_eval_datasets(cfg)
    for i in range(8):  # the digit as a user holds it: a 28 x 28 grey PIL image
        img = Image.fromarray((val.pixels[i, 0] * 255).round().to(torch.uint8).numpy(), mode="L")
        assert torch.equal(theirs(img), val[i][0])


def test_an_export_is_replaced_only_with_overwrite(study_checkpoint, tmp_path, capsys):
    _, ckpt = study_checkpoint
    out = tmp_path / "timm"
    args = ["export", "--checkpoint", str(ckpt), "--format", "timm", "--out", str(out)]
    assert main(args) == 0
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == first
    assert main([*args, "--overwrite"]) == 0


def test_non_finite_weights_are_not_exported(study_checkpoint, tmp_path, capsys):
    encoder, ckpt = study_checkpoint
    state = torch.load(ckpt, weights_only=True)
    state["model"]["encoder.norm.weight"][0] = float("nan")
    torch.save(state, ckpt)
    out = tmp_path / "timm"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "timm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "norm.weight" in err, err
    assert not out.exists()


def test_export_pools_as_evaluate_does_by_default(study_checkpoint, tmp_path, capsys):
    import argparse

    from study.cli.evaluate import add_arguments as evaluate_arguments
    from study.evaluation.export import add_arguments as export_arguments

    parsers = {}
    for name, add in (("export", export_arguments), ("evaluate", evaluate_arguments)):
        parsers[name] = argparse.ArgumentParser()
        add(parsers[name])
    from study.evaluation.features import default_pool

    # both leave the pool to the data: default_pool of the checkpoint's config
    assert parsers["evaluate"].parse_args(["--checkpoint", "x"]).pool is None
    assert parsers["export"].parse_args(["--checkpoint", "x", "--format", "timm", "--out", "y"]).pool is None
    assert default_pool(load_config(None, TINY).data.name) == "mean" and default_pool("imagenet100") == "cls"
    assert "(default: evaluate's" in " ".join(parsers["export"].format_help().split())
    encoder, ckpt = study_checkpoint
    assert main(["export", "--checkpoint", str(ckpt), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]["global_pool"] == "avg"
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        _close(model(_images()), encoder.features(_images(), "mean"))


def test_exports_folder_is_ignored_by_git():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["git", "check-ignore", "-q", "exports/x-timm/config.json"], cwd=root)
    assert done.returncode == 0
