"""Provenance: the git commit and package versions that run folders and checkpoints record."""

import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from study.config import load_config
from study.train.checkpoint import (INTEGRITY, PROVENANCE, load_checkpoint, save_checkpoint, save_weights_only,
                                    state_digest)
from study.train.loop import pretrain
from study.train.run_folder import record_provenance
from study.utils import provenance as prov

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["git_commit", "git_dirty", "torch", "torchvision", "timm", "python"]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(folder, *args) -> str:
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_keys_and_versions():
    p = prov.provenance()
    assert list(p) == KEYS
    assert p["torch"] == torch.__version__ and p["python"] == platform.python_version()
    assert isinstance(p["timm"], str) and isinstance(p["torchvision"], str)


def test_it_is_computed_once_and_callers_get_copies(monkeypatch):
    first = prov.provenance()
    first["torch"] = "changed by a caller"
    monkeypatch.setattr(prov, "_git", lambda *a: pytest.fail("git asked again"))
    assert prov.provenance()["torch"] == torch.__version__


@needs_git
def test_this_checkout_reports_its_commit():
    try:
        head = _git(ROOT, "rev-parse", "HEAD")
    except subprocess.CalledProcessError:
        pytest.skip("the tests run outside a git checkout")
    p = prov.provenance()
    assert p["git_commit"] == head and len(head) == 40
    assert isinstance(p["git_dirty"], bool)


@needs_git
def test_dirty_means_changed_tracked_files(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "a")
    (tmp_path / "untracked.py").write_text("")
    assert prov.git_state(tmp_path) == {"git_commit": _git(tmp_path, "rev-parse", "HEAD"), "git_dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert prov.git_state(tmp_path)["git_dirty"] is True


@needs_git
def test_no_repository_gives_none(tmp_path):
    none = {"git_commit": None, "git_dirty": None}
    assert prov.git_state(tmp_path) == none
    # a package installed into a virtual environment inside some checkout: that checkout's commit is not its own
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    _git(tmp_path, "add", ".gitignore")
    _git(tmp_path, "commit", "-q", "-m", "a")
    installed = tmp_path / ".venv" / "site-packages" / "study"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    assert prov.git_state(installed) == none


def test_missing_git_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert prov.git_state(ROOT) == {"git_commit": None, "git_dirty": None}


def test_checkpoints_record_it_and_copies_keep_their_own(tmp_path):
    save_checkpoint(tmp_path / "new.pt", {"epoch": 0})
    assert load_checkpoint(tmp_path / "new.pt")[PROVENANCE] == prov.provenance()
    older = {"git_commit": "0" * 40, "git_dirty": False}
    save_weights_only(tmp_path / "copy.pt", {"model": {}, PROVENANCE: older})
    assert load_checkpoint(tmp_path / "copy.pt")[PROVENANCE] == older
    save_weights_only(tmp_path / "unknown.pt", {"model": {}})  # the copy of a checkpoint that predates it
    assert load_checkpoint(tmp_path / "unknown.pt")[PROVENANCE] is None


def test_run_folder_lines_follow_the_epochs_kept(tmp_path):
    for start in (0, 3, 5, 3):
        record_provenance(tmp_path, start)
    lines = [json.loads(line) for line in (tmp_path / "provenance.jsonl").read_text().splitlines()]
    assert [line["start_epoch"] for line in lines] == [0, 3]
    assert lines[1] == {"start_epoch": 3, **prov.provenance()}


def _without_provenance(path: Path) -> None:
    """Rewrite ``path`` as a checkpoint written before checkpoints recorded provenance (its integrity record too)."""
    body = load_checkpoint(path)
    del body[PROVENANCE]
    torch.save({**body, INTEGRITY: state_digest(body)}, path)


def test_a_pretraining_run_records_it_and_resumes_from_a_checkpoint_without_it(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(size=16, width=16, per_class=40)
    pretrain(load_config(None, [*overrides, "epochs=1"]), out, progress=False)
    assert load_checkpoint(out / "checkpoint.pt")[PROVENANCE] == prov.provenance()
    assert json.loads((out / "provenance.jsonl").read_text()) == {"start_epoch": 0, **prov.provenance()}

    _without_provenance(out / "checkpoint.pt")
    assert PROVENANCE not in load_checkpoint(out / "checkpoint.pt")
    pretrain(load_config(None, [*overrides, "epochs=2"]), out, resume=True, progress=False)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1 and state[PROVENANCE] == prov.provenance()
    starts = [json.loads(line)["start_epoch"] for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert starts == [0, 1]
