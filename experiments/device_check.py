"""The GPU check of the scale path: what one GPU delivers on the poster's model, in under 8 minutes.

    experiments/device_check.sh                       # on a GPU machine: writes results/bench/<gpu>.json
    experiments/device_check.sh --tiny --out F.json   # every step at a CPU size (the tests run this)

Steps, each timed and written into one JSON file:
  1. the training-step bench at bf16, batch 256 (LS, image cIMLE k = 8 at the decoder input, Masked VAE;
     then cIMLE with per-token noise in the head): FLOP/s and the share of the measured bf16 matmul peak
  2. a fake ImageNet tree -> build-in100 -> pack, then bench-data on the GPU: images/s into the GPU
  3. a few hundred steps of in100-vit-t (LS, then cIMLE) on the pack: images/s and peak memory
  4. a one-process NCCL DDP step of every objective (find_unused_parameters=False)
  5. a step of every objective under torch.cuda.set_sync_debug_mode("error"): no host sync
  6. torch.compile beside eager: compilation time and step time (LS, cIMLE)
  7. a one-epoch finetune of step 3's LS run (gpu preset): finetune images/s
and the poster run's projected cost from step 3's rates (the bench adds selection memory at batch 512).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments.device_steps import compile_vs_eager, sync_free_steps  # noqa: E402

IN100 = "experiments/configs/in100-vit-t.yaml"
POSTER_IMAGES = 126_689 * 800
# CPU-sized stand-ins for the tests: the same steps on a model and data small enough for two cores
TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
              "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2", "noise.dim=4", "cimle.k=2",
              "optim.batch_size=16", "optim.effective_batch=null", "precision=fp32", "device=cpu"]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _run(args: list[str], log: Path, timeout: float) -> float:
    """Run ``python -m <module> ...`` (or a script), its output appended to ``log``; returns seconds."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(args[:4])} ... exited {proc.returncode}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


def _bench(tiny: bool, work: Path, log: Path, device: str) -> dict:
    common = ["-m", "experiments.bench", "--config", IN100, "--no-selection-timing",
              "--k", "8" if not tiny else "2"]
    if tiny:
        common += _sets(TINY_MODEL) + ["--precision", "fp32", "--batch", "8", "--steps", "1", "--warmup", "0"]
    else:
        common += _sets([f"device={device}"]) + ["--precision", "bf16", "--batch", "256", "--steps", "10",
                                                 "--warmup", "3"]
    out = {}
    for name, extra in (("image_noise", []), ("token_head", _sets(["noise.block=head", "noise.scope=token"]))):
        path = work / f"bench_{name}.json"
        seconds = _run(common + extra + ["--out", str(path)], log, timeout=300)
        data = json.loads(path.read_text())
        out[name] = {"seconds": seconds, "result": _bench_rows(data)}
    return out


def _bench_rows(data: dict) -> dict:
    """Per precision: each variant's step time, images/s, FLOP/s, share of the measured matmul peak, memory."""
    out = {}
    for precision, p in data["precisions"].items():
        out[precision] = {
            "matmul_peak_flop_per_s": p["efficiency"]["matmul_peak"]["flop_per_s"],
            "rows": {r["name"]: {k: r.get(k) for k in ("step_s", "images_per_s", "achieved_flop_per_s",
                                                        "peak_share", "peak_bytes", "vs_ls")} for r in p["rows"]},
            "selection_memory_at_batch_512": p["selection_memory"].get("at_batch_512"),
        }
    return out


def _data(tiny: bool, work: Path, log: Path, device: str) -> dict:
    fake, in100, pack = work / "fake", work / "in100", work / "in100-packed"
    per_class = ["--train-per-class", "2", "--val-per-class", "1", "--min-side", "40", "--max-side", "64"] if tiny \
        else ["--train-per-class", "48", "--val-per-class", "2"]
    t = {"fake_tree_s": _run(["-m", "study.data.fake_imagenet", "--out", str(fake), *per_class], log, timeout=240)}
    t["build_in100_s"] = _run(["-m", "study", "build-in100", "--src", str(fake), "--dst", str(in100)], log, 60)
    sets = _sets([f"data.root={in100}", f"data.packed={pack}"] + (TINY_MODEL if tiny else []))
    workers = str(min(16, os.cpu_count() or 1))
    t["pack_s"] = _run(["-m", "study", "pack", "--config", IN100, *sets, "--size", "40" if tiny else "256",
                        "--workers", workers], log, timeout=240)
    bench = work / "bench_data.json"
    t["bench_data_s"] = _run(["-m", "study", "bench-data", "--config", IN100, *sets, "--device", device,
                              "--images", "64" if tiny else "1024", "--batch", "16" if tiny else "256",
                              "--size", "40" if tiny else "256", "--out", str(bench)], log, timeout=240)
    return {"timings": t, "bench_data": json.loads(bench.read_text()), "sets": sets}


def _train(tiny: bool, work: Path, log: Path, sets: list[str]) -> dict:
    """Pretraining on the pack; 4,992 images / 512 = 9 micro-steps an epoch, 36 epochs ~ 324 steps (LS)."""
    out = {}
    for objective, epochs in (("ls", 2 if tiny else 36), ("cimle", 1 if tiny else 12)):
        run = work / f"run_{objective}"
        extra = _sets([f"objective={objective}", f"epochs={epochs}", "optim.warmup_epochs=1",
                       "checkpoint_every=1000"])
        seconds = _run(["-m", "study", "pretrain", "--config", IN100, *sets, *extra, "--out", str(run), "--quiet"],
                       log, timeout=300)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steady = rows[1:] or rows  # the first epoch holds compilation and warm-up
        out[objective] = {
            "seconds": seconds, "epochs": epochs,
            "images_per_s": sum(r["images_per_sec"] for r in steady) / len(steady),
            "data_wait_frac": sum(r["data_wait_frac"] for r in steady) / len(steady),
            "max_memory_gib": max((r.get("max_memory_gib", 0.0) for r in rows), default=None),
            "final_loss": rows[-1]["loss"],
        }
    for r in out.values():
        r["poster_run_gpu_hours_one_gpu"] = POSTER_IMAGES / r["images_per_s"] / 3600
    return out


def _ddp_step(tiny: bool) -> dict:
    """Two training steps (study.train.step.train_step) per objective under DDP in a one-process group (NCCL on a
    GPU, gloo on CPU)."""
    import torch.distributed as dist

    from study.config import load_config
    from study.methods.model import build_model
    from study.train.step import train_step, training_state

    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    with tempfile.NamedTemporaryFile(delete=False) as fh:
        init = f"file://{fh.name}"
    dist.init_process_group(backend, init_method=init, rank=0, world_size=1)
    out = {"backend": backend}
    try:
        for objective in ("ls", "cimle", "mvae"):
            cfg = load_config(IN100, [f"objective={objective}", "device=" + device.type]
                              + ([] if cuda else ["precision=fp32"]) + (TINY_MODEL if tiny else []))
            state = training_state(cfg, build_model(cfg).to(device), device)
            state.net = torch.nn.parallel.DistributedDataParallel(state.model, device_ids=[0] if cuda else None,
                                                                  find_unused_parameters=False)
            imgs = torch.randn(8 if tiny else 64, 3, cfg.model.img_size, cfg.model.img_size, device=device)
            t0 = time.perf_counter()
            for _ in range(2):  # the second step checks the reducer is ready again (no unused parameters)
                loss = train_step(state, imgs).loss
            if cuda:
                torch.cuda.synchronize()
            out[objective] = {"ok": True, "seconds": time.perf_counter() - t0, "loss": loss.detach().item()}
    finally:
        dist.destroy_process_group()
        os.unlink(init.removeprefix("file://"))
    return out


def _finetune(tiny: bool, work: Path, log: Path, sets: list[str]) -> dict:
    """One finetune epoch of the LS run on the in100 tree (the evaluation pass included), pretrained only."""
    results = work / "finetune.csv"
    seconds = _run(["-m", "study", "evaluate", "--checkpoint", str(work / "run_ls"), "--protocols", "finetune",
                    "--preset", "cpu" if tiny else "gpu", "--finetune-epochs", "1", "--no-random-baseline",
                    "--results", str(results), "--quiet", *sets], log, timeout=300)
    rows = {r["metric"]: float(r["value"]) for r in csv.DictReader(open(results))}
    images = sum(1 for _ in (work / "in100" / "train").glob("*/*"))
    return {"seconds": seconds, "train_images": images, "finetune_seconds": rows["finetune_seconds"],
            "images_per_s": images / rows["finetune_seconds"], "top1": rows["finetune_top1"]}


def _gpu_slug() -> str:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="every step at a CPU size, on the CPU (for the tests)")
    p.add_argument("--out", default=None, help="JSON to write (default results/bench/<gpu>.json)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("error: no GPU visible; the device check needs one (--tiny runs its steps at a CPU size)",
              file=sys.stderr)
        return 2
    device = "cpu" if args.tiny else "cuda"
    out = Path(args.out or ROOT / "results" / "bench" / f"{_gpu_slug()}.json")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        log = work / "device_check.log"
        result = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "tiny": args.tiny, "steps": {}}
        steps = [("bench", lambda: _bench(args.tiny, work, log, device)),
                 ("data", lambda: _data(args.tiny, work, log, device)),
                 ("train", lambda: _train(args.tiny, work, log, result["steps"]["data"]["ok"]["sets"])),
                 ("ddp", lambda: _ddp_step(args.tiny)),
                 ("sync_free", lambda: sync_free_steps(torch.device(device), TINY_MODEL)),
                 ("compile", lambda: compile_vs_eager(torch.device(device), TINY_MODEL, 2 if args.tiny else 20)),
                 ("finetune", lambda: _finetune(args.tiny, work, log, result["steps"]["data"]["ok"]["sets"]))]
        for name, step in steps:
            needs = {"train": "data", "finetune": "train"}.get(name)
            if needs and "error" in result["steps"][needs]:
                result["steps"][name] = {"error": f"skipped: the {needs} step failed", "seconds": 0.0}
                continue
            t0 = time.perf_counter()
            print(f"[device check] {name} ...", flush=True)
            try:
                result["steps"][name] = {"ok": step(), "seconds": time.perf_counter() - t0}
            except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others' figures
                result["steps"][name] = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
            print(f"[device check] {name}: {'ok' if 'ok' in result['steps'][name] else 'FAILED'} "
                  f"({result['steps'][name]['seconds']:.0f} s)", flush=True)
        result["seconds"] = time.perf_counter() - t_start
        if log.exists():
            result["log_tail"] = log.read_text().splitlines()[-40:]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    tmp_out.replace(out)
    failed = [k for k, v in result["steps"].items() if "error" in v]
    print(f"[device check] wrote {out} in {result['seconds']:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every step ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
