"""Does the packed pipeline train the same encoder as the folder pipeline? A small CPU check, 3 seeds, paired.

    python experiments/packed_vs_folder.py [--out results/packed_vs_folder.csv] [--seeds 0,1,2]

On a fake ImageNet-100 (study.data.fake_imagenet: 100 classes x 24 train + 4 val JPEGs of 64-96 px), the
same model, recipe and seeds are pretrained twice (LS, 40 epochs at 32 px): once decoding the JPEGs
with PIL (RobustImageFolder + MAE's RandomResizedCrop/flip, the folder pipeline) and once from a pack
of the same images (stored at 40 px, cropped in batches by DeviceCrops). Both are evaluated by the same
k-NN on the folder's eval transform. The crops follow the same distribution by construction (a test
checks it against torchvision); what differs is where the crop is resampled from (the original
JPEG or its 40 x 40 copy) and the random stream. The question is whether that moves k-NN beyond
seed noise: the paired differences packed - folder, with a t interval over seeds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from study.config import load_config  # noqa: E402
from study.evaluation.run import evaluate  # noqa: E402
from study.data.image_folders import RobustImageFolder  # noqa: E402
from study.utils.io import atomic_write_text  # noqa: E402
from study.data.packed import pack_folder  # noqa: E402
from study.evaluation.statistics import t_interval  # noqa: E402
from study.train.loop import pretrain  # noqa: E402

RECIPE = ["data.name=imagenet100", "model.img_size=32", "model.patch_size=8", "model.in_chans=3",
          "model.embed_dim=64", "model.depth=3", "model.num_heads=4", "model.decoder_dim=48",
          "model.decoder_depth=1", "model.decoder_heads=4", "epochs=40", "optim.batch_size=128",
          "optim.blr=1.5e-4", "optim.warmup_epochs=5", "mask.ratio=0.75", "checkpoint_every=1000"]


def _data(work: Path) -> Path:
    fake, in100 = work / "imagenet1k", work / "imagenet100"
    py = [sys.executable, "-m"]
    subprocess.run(py + ["study.data.fake_imagenet", "--out", str(fake), "--train-per-class", "24", "--val-per-class",
                         "4", "--min-side", "64", "--max-side", "96"], check=True, cwd=ROOT)
    subprocess.run(py + ["study", "build-in100", "--src", str(fake), "--dst", str(in100)], check=True, cwd=ROOT)
    pack_folder(RobustImageFolder(in100 / "train"), work / "packed", size=40, progress=False)
    return in100


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/packed_vs_folder.csv", help="results table (default runs/...)")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        in100 = _data(work)
        for seed in seeds:
            for pipeline in ("folder", "packed"):
                extra = [f"data.root={in100}", f"seed={seed}"]
                if pipeline == "packed":
                    extra.append(f"data.packed={work / 'packed'}")
                cfg = load_config(None, RECIPE + extra)
                run = work / f"{pipeline}_{seed}"
                t0 = time.perf_counter()
                last = pretrain(cfg, run, progress=False)
                seconds = time.perf_counter() - t0
                for r in evaluate(run / "checkpoint.pt", "knn", results=None, pool="mean", knn_ks=(20,), progress=False,
                                  verbose=False, random_baseline=pipeline == "folder"):
                    rows.append({"pipeline": pipeline if r["encoder"] == "pretrained" else "random init",
                                 "seed": seed, "metric": r["metric"], "value": r["value"],
                                 "train_seconds": seconds if r["encoder"] == "pretrained" else None,
                                 "final_loss": last["loss"] if r["encoder"] == "pretrained" else None})
                knn = next(r["value"] for r in rows[::-1] if r["pipeline"] == pipeline and r["metric"] == "knn_top1")
                print(f"seed {seed} {pipeline}: k-NN top-1 {knn:.4f} ({seconds:.0f} s of pretraining)", flush=True)
    table = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), table.to_csv(index=False))
    knn = table[table.metric == "knn_top1"].pivot(index="seed", columns="pipeline", values="value")
    mean, lo, hi = t_interval((knn["packed"] - knn["folder"]).to_numpy())
    print(knn.round(4).to_string())
    print(f"k-NN top-1, packed - folder: {100 * mean:+.2f} points, 95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}] "
          f"over {len(knn)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
