"""Malformed configs, flags and files fed to every command: one line ``error: ...``, exit 2, no file touched."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from conftest import as_sets, make_image_folder, tiny_overrides
from study.cli import main as cli_main
from study.train.run_lock import RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_overrides("epochs=1")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with what a user has at hand: a finished run, a sweep file, an export, a text file, and a
    folder that a live run holds (its lock taken by this process)."""
    work = tmp_path_factory.mktemp("fuzz")
    assert cli_main(["pretrain", "--out", str(work / "run"), "--quiet", *as_sets(TINY)]) == 0
    (work / "notes.txt").write_text("not a checkpoint\n")
    (work / "broken.yaml").write_text("model: [unclosed\n")
    (work / "export").mkdir()
    (work / "export" / "config.json").write_text("{}\n")
    sweep = textwrap.dedent(f"""\
        name: fuzz
        config: {ROOT / 'experiments/configs/cpu-small.yaml'}
        run_notebook: {ROOT / 'notebooks/run.py'}
        grid:
          mask.ratio: [0.5]
        seeds: [0]
        """)
    (work / "sweep.yaml").write_text(sweep)
    (work / "sweep_parallel0.yaml").write_text(sweep + "parallel: 0\n")
    # a results table edited by hand: text in a numeric column on line 3
    (work / "broken.csv").write_text("metric,value,seed\nknn_top1,0.5,0\nknn_top1,0.5,zero\n")
    (work / "sweep_broken.yaml").write_text(sweep + f"results: {work / 'broken.csv'}\n"
                                            f"report_notebook: {ROOT / 'notebooks/mask_strength.py'}\n")
    (work / "sweep_no_run.yaml").write_text(sweep.replace(str(ROOT / "notebooks/run.py"), str(work / "no_run.py")))
    (work / "sweep_no_report.yaml").write_text(sweep + f"report_notebook: {work / 'no_report.py'}\n")
    (work / "empty.yaml").write_text("# to be written\n")
    (work / "dup.yaml").write_text("mask:\n  ratio: 0.5\n  ratio: 0.6\n")
    make_image_folder(work / "imgs", classes=2, per_class=2)
    (work / "busy").mkdir()
    with RunLock(work / "busy"):
        yield work


def _cases(w: Path) -> list[tuple[list[str], str]]:
    """(command line, a word the error line must hold)."""
    run, ckpt = str(w / "run"), str(w / "run" / "checkpoint.pt")
    ev = ["evaluate", "--checkpoint", ckpt, "--results", str(w / "results.csv")]
    cpu_small = str(ROOT / "experiments/configs/cpu-small.yaml")
    return [
        # evaluate: every numeric flag out of range, before any feature is computed
        (ev + ["--knn-k", "0"], "--knn-k"),
        (ev + ["--knn-k", "100000"], "training images"),
        (ev + ["--knn-temperature", "0"], "--knn-temperature"),
        (ev + ["--knn-temperature", "nan"], "--knn-temperature"),
        (ev + ["--linear-epochs", "0"], "--linear-epochs"),
        (ev + ["--finetune-epochs", "-1"], "--finetune-epochs"),
        (ev + ["--threads", "0"], "--threads"),
        (ev + ["--batch-size", "0"], "--batch-size"),
        (ev + ["--pool", "max"], "--pool"),
        (ev + ["--protocols", "knn,bogus"], "bogus"),
        (["evaluate", "--checkpoint", str(w / "missing.pt")], "missing.pt"),
        (["evaluate", "--checkpoint", str(w / "notes.txt"), "--results", str(w / "results.csv")], "notes.txt"),
        # pretrain: configs that cannot be meant
        (["pretrain", "--config", cpu_small, "--set", "epochs=5", "--out", str(w / "new1")], "warmup_epochs"),
        (["pretrain", "--out", str(w / "new2"), *as_sets(TINY), "--set", "model.depth=0"], "model.depth"),
        (["pretrain", "--out", str(w / "new3"), *as_sets(TINY), "--set", "nosuch.key=1"], "nosuch"),
        (["pretrain", "--out", str(w / "new4"), *as_sets(TINY), "--set", "mask.ratio=1.5"], "mask.ratio"),
        (["pretrain", "--out", str(w / "new5"), "--config", str(w / "nowhere.yaml")], "nowhere.yaml"),
        (["pretrain", "--out", str(w / "new6"), "--config", str(w / "broken.yaml")], "broken.yaml"),
        (["pretrain", "--out", str(w / "notes.txt"), *as_sets(TINY)], "notes.txt"),
        (["pretrain", "--out", run, "--resume", *as_sets(TINY), "--set", "cimle.k=3"], "cimle.k"),
        (["pretrain", "--out", str(w / "new10"), "--config", str(w / "empty.yaml")], "empty"),
        (["pretrain", "--out", str(w / "new11"), "--config", str(w / "dup.yaml")], "mask.ratio"),
        (["pretrain", "--out", str(w / "new12"), *as_sets(TINY), "--set", "seed=-1"], "seed"),
        (["pretrain", "--out", str(w / "new13"), *as_sets(TINY), "--set", f"seed={2**32}"], "seed"),
        (["pretrain", "--out", str(w / "new14"), *as_sets(TINY), "--set", "optim.blr=inf"], "optim.blr"),
        (["pretrain", "--out", str(w / "new15"), *as_sets(TINY), "--set", "optim.weight_decay=.nan"], "finite"),
        (["pretrain", "--out", str(w / "new16"), *as_sets(TINY), "--set", "mask.kind=block",
          "--set", "mask.block_min_patches=3"], "mask.block_min_patches"),
        # refused once the data is built, before any training: the folder made for the run goes again
        (["pretrain", "--out", str(w / "new17"), *as_sets(TINY), "--set", "optim.batch_size=64"], "optim.batch_size"),
        (["pretrain", "--out", str(w / "new18"), *as_sets(TINY), "--set", "data.name=imagefolder",
          "--set", f"data.root={w / 'imgs'}", "--set", "model.in_chans=1"], "model.in_chans"),
        # a folder that a live run holds
        (["pretrain", "--out", str(w / "busy"), *as_sets(TINY)], "pid"),
        (["pretrain", "--out", str(w / "busy"), "--resume", *as_sets(TINY)], "still running"),
        # sweep, submit, pack, export, bench-data, build-in100
        (["sweep", str(w / "sweep.yaml"), "--parallel", "0"], "--parallel"),
        (["sweep", str(w / "sweep_parallel0.yaml")], "parallel"),
        (["sweep", str(w / "no_sweep.yaml")], "no_sweep.yaml"),
        (["sweep", str(w / "sweep_no_run.yaml")], "no_run.py"),
        (["sweep", str(w / "sweep_no_report.yaml"), "--report-only"], "no_report.py"),
        (["sweep", str(w / "sweep_broken.yaml")], "broken.csv:3"),
        (["sweep", str(w / "sweep_broken.yaml"), "--report-only"], "broken.csv:3"),
        # a results table broken by hand, a feature cache that is a file
        (ev + ["--results", str(w / "broken.csv")], "broken.csv:3"),
        (ev + ["--feature-cache", str(w / "notes.txt")], "--feature-cache"),
        # the toy's own script
        (["toy", "--seeds", "0"], "--seeds"),
        (["toy", "--plot-only", "--out", str(w / "no_toy")], "no_toy"),
        (["submit", "--out", str(w / "new7"), "--nodes", "0"], "--nodes"),
        (["submit", "--out", str(w / "new8"), "--gpus-per-node", "0"], "--gpus-per-node"),
        (["pack", "--dst", str(w / "pack"), "--size", "0"], "--size"),
        (["pack", "--dst", str(w / "pack"), "--workers", "-1"], "--workers"),
        (["export", "--checkpoint", ckpt, "--format", "onnx", "--out", str(w / "new9")], "--format"),
        (["export", "--checkpoint", ckpt, "--format", "timm", "--out", str(w / "export")], "--overwrite"),
        (["export", "--checkpoint", ckpt, "--format", "timm", "--out", str(w / "notes.txt")], "notes.txt"),
        (["bench-data", "--rate", "0"], "--rate"),
        (["build-in100", "--src", str(w / "no_imagenet"), "--dst", str(w / "in100")], "no_imagenet"),
        (["no-such-command"], "no-such-command"),
    ]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a hash of its bytes (folders as ``dir``)."""
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


def _call(argv: list[str]) -> int:
    try:
        if argv[0] == "toy":  # toy/regression_to_mean.py, run as a script
            from toy.regression_to_mean import _cli as toy_cli

            return toy_cli(argv[1:])
        return cli_main(argv)
    except SystemExit as exc:  # argparse's own exit, as the shell would see it
        return exc.code


def test_every_malformed_input_is_one_error_line_and_touches_nothing(work, capsys, monkeypatch):
    monkeypatch.chdir(work)  # relative defaults (runs/results.csv, runs/figures) land where we look
    cases = _cases(work)
    assert len(cases) >= 20
    before = _snapshot(work)
    capsys.readouterr()
    failures = []
    for argv, word in cases:
        code = _call(argv)
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0]
              and "Traceback" not in captured.out)
        if not ok:
            failures.append(f"{' '.join(argv[:4])} ... -> exit {code}, stderr {captured.err.strip()[:400]!r}")
        after = _snapshot(work)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            failures.append(f"{' '.join(argv[:4])} ... changed files: {changed[:4]}")
            before = after
    assert not failures, "\n".join(failures)
