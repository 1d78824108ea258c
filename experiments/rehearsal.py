"""The ImageNet-100 study, rehearsed on CPU on an ImageNet-shaped fake: every command of the scale path, once.

``make rehearsal`` runs what a first day of GPU time would, at the poster's model
size (ViT-T/16, 224 px) on a few images: a fake ImageNet-1k tree, build-in100 and
pack; pretraining of every objective on the pack; a 2-process torchrun run killed
after its first checkpoint and resumed; every protocol that reads an image folder, and
a 2-process torchrun finetune;
both ImageNet-100 sweeps shrunk to 2 points with their notebooks; and ``submit``
through a fake SLURM. Every command runs as a user would type it, in a fresh
process, so what breaks is what would break on the cluster; the log of all of them
is ``DIR/rehearsal.log``, and a failing step stops with its log tail and status 1.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
IN100 = ROOT / "experiments" / "configs" / "in100-vit-t.yaml"
# CPU-sized: the poster's model, a handful of images, two accumulation steps, few epochs
CPU = ["device=cpu", "precision=fp32", "data.subset=32", "data.num_workers=2", "optim.batch_size=8",
       "optim.effective_batch=16", "optim.warmup_epochs=1", "checkpoint_every=1", "cimle.k=2",
       "monitor.train_images=64", "monitor.val_images=32"]


class StepFailed(RuntimeError):
    pass


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Rehearsal:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.log = work / "rehearsal.log"
        self.times: list[tuple[str, float]] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}

    def sh(self, args: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
           expect: int = 0) -> None:
        with open(self.log, "a") as fh:
            fh.write(f"\n$ {' '.join(map(str, args))}\n")
            fh.flush()
            proc = subprocess.run([str(a) for a in args], cwd=cwd or ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                  env=env or self.env, timeout=timeout)
        if proc.returncode != expect:
            raise StepFailed(f"{' '.join(map(str, args[:6]))} ... exited {proc.returncode}")

    def study(self, *args, **kw) -> None:
        self.sh([sys.executable, "-m", "study", *args], **kw)

    def step(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        print(f"[rehearsal] {name} ...", flush=True)
        fn()
        self.times.append((name, time.perf_counter() - t0))
        print(f"[rehearsal] {name}: ok ({self.times[-1][1]:.0f} s)", flush=True)

    # ------------------------------------------------------------------ the data

    def data(self) -> None:
        w = self.work
        self.sh([sys.executable, "-m", "study.data.fake_imagenet", "--out", w / "imagenet1k", "--val-per-class", "1"])
        self.study("build-in100", "--src", w / "imagenet1k", "--dst", w / "imagenet100")
        assert len(list((w / "imagenet100" / "val").iterdir())) == 100, "build-in100 did not sort the flat val"
        self.study("pack", "--config", IN100, *self.sets(), "--workers", "2")
        assert (w / "imagenet100-packed" / "meta.json").is_file()

    def sets(self, *extra: str) -> list[str]:
        items = [f"data.root={self.work / 'imagenet100'}", f"data.packed={self.work / 'imagenet100-packed'}",
                 *CPU, *extra]
        return [a for item in items for a in ("--set", item)]

    # ------------------------------------------------------------------ training

    def pretrain(self) -> None:
        for objective in ("ls", "cimle", "mvae"):
            run = self.work / "runs" / objective
            self.study("pretrain", "--config", IN100, *self.sets(f"objective={objective}", "epochs=1"), "--out", run)
            assert (run / "checkpoint.pt").is_file() and (run / "provenance.jsonl").is_file()
            if "monitor_knn_top1" not in (run / "metrics.jsonl").read_text():
                raise StepFailed(f"the {objective} run logged no k-NN monitor reading (monitor.knn_every)")

    def torchrun(self) -> None:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
        if torchrun is None:
            raise StepFailed("torchrun is not installed next to this python")
        run = self.work / "runs" / "torchrun"
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "study", "pretrain", "--config", IN100,
               *self.sets("objective=cimle", "epochs=3", "optim.batch_size=4", "optim.effective_batch=8"),
               "--out", run]
        env = {**self.env, "OMP_NUM_THREADS": "1"}
        with open(self.log, "a") as fh:
            fh.write(f"\n$ {' '.join(map(str, cmd))}   (killed after its first checkpoint)\n")
            fh.flush()
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            deadline = time.time() + 300
            while not (run / "checkpoint.pt").exists():
                if proc.poll() is not None or time.time() > deadline:
                    _kill_tree(proc.pid)
                    raise StepFailed(f"torchrun ended (status {proc.returncode}) before its first checkpoint")
                time.sleep(0.2)
            _kill_tree(proc.pid)  # torchrun and both workers at once, as a node failure or preemption would
            proc.wait()
        self.sh(cmd + ["--resume"], env=env)
        import json

        epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        if epochs != [0, 1, 2]:
            raise StepFailed(f"the resumed torchrun run logged epochs {epochs}, not [0, 1, 2]")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> None:
        results = self.work / "results" / "evaluate.csv"
        # the GPU presets at the rehearsal's scale: 2 probe epochs must reach 8 steps (MAE's 90 reach 7,000)
        self.study("evaluate", "--checkpoint", self.work / "runs" / "ls" / "checkpoint.pt",
                   "--protocols", "knn,linear,finetune,samples", "--preset", "gpu", "--finetune-epochs", "1",
                   "--finetune-seeds", "0,1", "--linear-epochs", "2", "--linear-min-steps", "8",
                   "--results", results, "--figures", self.work / "figures")
        rows = list(csv.DictReader(open(results)))
        missing = {"knn", "linear", "finetune"} - {row["metric"].split("_")[0] for row in rows}
        if missing:
            raise StepFailed(f"evaluate wrote no rows of {sorted(missing)}")
        knn_ks = {r["knn_k"] for r in rows if r["metric"] == "knn_top1"}
        pools = {r["pool"] for r in rows if r["metric"] in ("knn_top1", "linear_top1")}
        steps = {int(r["linear_steps"]) for r in rows if r["metric"] == "linear_top1"}
        ft_seeds = {r["finetune_seed"] for r in rows if r["metric"] == "finetune_top1"}
        if len(knn_ks) < 2 or pools != {"cls"} or min(steps) < 8 or ft_seeds != {"0", "1"} or "git_commit" not in rows[0]:
            raise StepFailed(f"evaluate rows: k-NN at k {knn_ks} (want several), pools {pools} (want cls, MAE's "
                             f"and DINO's), probe steps {steps} (want >= 8), finetune seeds {ft_seeds} (want 0, 1), "
                             f"commit {rows[0]['git_commit']!r}")

    def finetune_torchrun(self) -> None:
        """The GPU finetune preset in 2 processes (gloo) for 2 steps: rows once, from rank 0, a top-1 each."""
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
        if torchrun is None:
            raise StepFailed("torchrun is not installed next to this python")
        results = self.work / "results" / "finetune_torchrun.csv"
        self.sh([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "study", "evaluate", "--checkpoint",
                 self.work / "runs" / "ls" / "checkpoint.pt", "--protocols", "finetune", "--preset", "gpu",
                 "--finetune-epochs", "1", "--finetune-max-steps", "2", "--finetune-workers", "1",
                 "--results", results], env={**self.env, "OMP_NUM_THREADS": "1"})
        rows = [r for r in csv.DictReader(open(results)) if r["metric"] == "finetune_top1"]
        encoders = sorted(r["encoder"] for r in rows)
        values = [float(r["value"]) for r in rows]
        if encoders != ["pretrained", "random"] or {r["finetune_processes"] for r in rows} != {"2"} \
                or not all(0 <= v <= 1 for v in values):
            raise StepFailed(f"torchrun finetune rows: encoders {encoders} (want pretrained, random once each), "
                             f"processes {[r['finetune_processes'] for r in rows]} (want 2), top-1 {values}")

    def sweep_file(self, name: str, src: dict, grid: dict, fixed: dict) -> Path:
        """A shipped in100 sweep at the rehearsal's CPU scale, written into the work folder."""
        sweep = {**src, "name": name, "config": str(IN100), "results": f"results/{name}.csv",
                 "run_notebook": str(ROOT / src.get("run_notebook", "notebooks/run.py")),
                 "report_notebook": str(ROOT / src["report_notebook"]),
                 "runs_dir": "runs", "grid": grid, "gpus": None, "parallel": 1,
                 "parameters": {**src.get("parameters", {}), "finetune_epochs": 1},
                 "fixed": {**src.get("fixed", {}), **{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in CPU)},
                           "data.root": str(self.work / "imagenet100"),
                           "data.packed": str(self.work / "imagenet100-packed"), "epochs": 1, **fixed}}
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sweep, sort_keys=False))
        return path

    def sweep_submit(self) -> None:
        """One point of the mask-strength sweep sent to the fake SLURM as a job array, merged by the next run."""
        src = yaml.safe_load((ROOT / "experiments" / "sweeps" / "mask_strength_in100.yaml").read_text())
        path = self.sweep_file("submitted_in100", {**src, "protocols": ["knn"]},
                               {"objective": ["ls"], "mask.ratio": src["grid"]["mask.ratio"][1:2]}, {})
        fake = ROOT / "tests" / "fake_slurm"
        state = self.work / "slurm-array-state"
        env = {**self.env, "PATH": f"{fake}{os.pathsep}{self.env['PATH']}", "FAKE_SLURM_STATE": str(state)}
        self.study("sweep", path.name, "--submit", cwd=self.work, env=env)
        deadline = time.time() + 300
        while not list(state.glob("*/rc")):
            if time.time() > deadline:
                raise StepFailed("the submitted sweep task did not end within 5 minutes")
            time.sleep(0.5)
        self.study("sweep", path.name, "--no-report", cwd=self.work)
        rows = list(csv.DictReader(open(self.work / "results" / "submitted_in100.csv")))
        if not any(r["metric"] == "knn_top1" for r in rows):
            raise StepFailed("the array task's k-NN rows did not reach the sweep's table")

    def sweeps(self) -> None:
        for name, fixed in (("mask_strength_in100", {}),
                            ("efficiency_in100", {"snapshot_epochs": [1, 2], "epochs": 2})):
            src = yaml.safe_load((ROOT / "experiments" / "sweeps" / f"{name}.yaml").read_text())
            grid = {key: values[:1] if key != "objective" else values for key, values in src["grid"].items()}
            path = self.sweep_file(name, src, grid, fixed)
            # run from the work folder: the sweep's results, runs and reports land there, not in the repository
            self.study("sweep", path.name, cwd=self.work)
            rows = list(csv.DictReader(open(self.work / "results" / f"{name}.csv")))
            points = {r["point"] for r in rows}
            wanted = {"knn", "linear"} | ({"finetune"} if "finetune" in src["protocols"] else set())
            if {r["pool"] for r in rows if r["metric"] == "knn_top1"} != {"cls", "mean"}:
                raise StepFailed(f"sweep {name} did not compute both pools")
            for point in points:
                have = {r["metric"].split("_")[0] for r in rows if r["point"] == point and r["encoder"] == "pretrained"}
                if not wanted <= have:
                    raise StepFailed(f"sweep {name} point {point} has rows of {sorted(have)}, not {sorted(wanted)}")
            random_points = {r["point"] for r in rows if r["encoder"] == "random"}
            if len(points) != 2 or len(random_points) != 1:
                raise StepFailed(f"sweep {name}: {len(points)} points (want 2), random-init rows at "
                                 f"{len(random_points)} (want 1, once per seed)")
            if not (self.work / "reports" / f"{name}.ipynb").is_file():
                raise StepFailed(f"sweep {name} wrote no report")

    # ------------------------------------------------------------------ cluster and GPU

    def submit(self) -> None:
        fake = ROOT / "tests" / "fake_slurm"
        state = self.work / "slurm-state"
        env = {**self.env, "PATH": f"{fake}{os.pathsep}{self.env['PATH']}", "FAKE_SLURM_STATE": str(state)}
        run = self.work / "runs" / "submitted"
        self.study("submit", "--config", IN100, *self.sets("epochs=1"), "--out", run, "--gpus-per-node", "1",
                   env=env)
        deadline = time.time() + 300
        while not list(state.glob("*/rc")):
            if time.time() > deadline:
                raise StepFailed("the submitted job did not end within 5 minutes")
            time.sleep(0.5)
        rc = next(state.glob("*/rc")).read_text().strip()
        if rc != "0" or not (run / "checkpoint.pt").is_file():
            raise StepFailed(f"the submitted job ended with status {rc} and "
                             f"{'a' if (run / 'checkpoint.pt').is_file() else 'no'} checkpoint")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/rehearsal", help="scratch folder, emptied first (default runs/rehearsal)")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    r = Rehearsal(work)
    t0 = time.perf_counter()
    steps = [("data: fake ImageNet, build-in100, pack", r.data), ("pretrain ls, cimle, mvae", r.pretrain),
             ("torchrun 2 processes, killed and resumed", r.torchrun), ("evaluate, every protocol", r.evaluate),
             ("finetune under torchrun, 2 processes", r.finetune_torchrun),
             ("both in100 sweeps, 2 points each, reports", r.sweeps), ("submit under a fake sbatch", r.submit),
             ("sweep --submit under a fake sbatch", r.sweep_submit)]
    try:
        for name, fn in steps:
            r.step(name, fn)
    except (StepFailed, AssertionError, subprocess.TimeoutExpired) as exc:
        tail = "\n".join(r.log.read_text().splitlines()[-30:]) if r.log.exists() else ""
        print(f"{tail}\n[rehearsal] FAILED: {exc or 'an assertion'} (log: {r.log})", file=sys.stderr)
        return 1
    total = time.perf_counter() - t0
    print(f"[rehearsal] every step passed in {total / 60:.1f} min: "
          + ", ".join(f"{name.split(':')[0]} {sec:.0f} s" for name, sec in r.times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
