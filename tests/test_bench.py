"""Smoke test of ``python -m study bench``: JSON structure and finite positive ratios (no timing assertions)."""

import argparse
import json
import math

import pytest
import torch

from study.bench.cli import _int_list
from study.bench.settings import with_changes
from study.bench.variants import Trainer
from study.cli import main as cli_main
from study.config import load_config

TINY = [
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
    "model.decoder_dim=16", "model.decoder_depth=2", "model.decoder_heads=2", "noise.dim=4", "mask.ratio=0.5",
]


def _is_pos(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    argv = ["bench"]
    for item in TINY:
        argv += ["--set", item]
    argv += ["--batch", "4", "--k", "1,2", "--steps", "2", "--warmup", "1", "--late-k", "2",
             "--selection-k", "2,4", "--selection-chunk", "1,2", "--out", str(out), *extra]
    assert cli_main(argv) == 0
    return json.loads(out.read_text())


def _check_common(res):
    for key in ("config", "settings", "environment", "rows", "components", "cimle_vs_cost_model", "cimle_vs_ls",
                "late_noise", "selection_memory", "parameters", "host_syncs", "targets", "robust_ratios"):
        assert key in res
    assert res["environment"]["device"] == "cpu" and res["environment"]["threads"] >= 1
    assert res["settings"]["batch"] == 4 and res["settings"]["ks"] == [1, 2]
    names = {r["name"] for r in res["rows"]}
    assert {"ls", "cimle k=1", "cimle k=2", "mvae"} <= names
    for r in res["rows"]:
        assert _is_pos(r["step_s"]) and _is_pos(r["images_per_s"]) and _is_pos(r["vs_ls"])
        assert _is_pos(r["peak_bytes"]) and r["loss_finite"]
    assert set(res["cimle_vs_cost_model"]) == set(res["cimle_vs_ls"]) == {"1", "2"}
    ratios = list(res["cimle_vs_cost_model"].values()) + list(res["cimle_vs_ls"].values())
    ratios += list(res["cimle_vs_cost_model_with_optimizer"].values()) + [res["mvae_vs_ls"], res["ls_vs_cost_model"]]
    for kind in ("paired_wall", "cpu_time"):
        rr = res["robust_ratios"][kind]
        ratios += list(rr["cimle_vs_cost_model"].values()) + list(rr["cimle_vs_ls"].values())
        ratios += list(rr["late_noise_vs_ls"].values()) + [rr["mvae_vs_ls"]]
    assert all(_is_pos(v) for v in ratios), ratios
    # late noise at the input and at the last decoder block (depth 2 -> blocks 0 and 1)
    assert [r["noise_block"] for r in res["late_noise"]] == [0, 1]
    for r in res["late_noise"]:
        assert _is_pos(r["vs_ls"]) and _is_pos(r["vs_cost_model"]) and r["k"] == 2
    sel = res["selection_memory"]
    assert {(r["k"], r["chunk"]) for r in sel["rows"]} == {(2, 1), (2, 2), (4, 1), (4, 2)}
    assert all(_is_pos(r["peak_bytes"]) for r in sel["rows"])
    assert isinstance(sel["verdict"]["grows_with_chunk_not_k"], bool)
    assert set(res["host_syncs"]) >= {"ls", "cimle k=1", "mvae"}


def test_bench_without_transformers(tmp_path):
    res = _run(tmp_path, "--no-transformers")
    _check_common(res)
    assert res["ours_vs_transformers"] is None and "transformers" not in res["parameters"]


def test_bench_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    res = _run(tmp_path)
    _check_common(res)
    assert _is_pos(res["ours_vs_transformers"])
    assert _is_pos(res["robust_ratios"]["paired_wall"]["ours_vs_transformers"])
    p = res["parameters"]
    assert p["ours_ls"]["total"] == p["transformers"]["total"]  # same architecture, same tensors
    assert any(r["name"] == "transformers ViTMAE" for r in res["rows"])


def test_int_list_minimum():
    assert _int_list("1,2, 4") == [1, 2, 4]
    assert _int_list("0,3", minimum=0) == [0, 3]
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        _int_list("0,3")
    with pytest.raises(argparse.ArgumentTypeError, match="integers"):
        _int_list("1,x")


def test_cimle_step_passes_k_per_call():
    """k reaches the model as an argument of each call; the trainer's config and the model stay as built."""
    cfg = with_changes(load_config(None, TINY + ["cimle.k=3"]), objective="cimle")
    imgs = torch.randn(2, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    tr = Trainer(cfg, torch.device("cpu"), imgs, compile_model=False)
    seen = []
    forward = tr.model.forward
    tr.model.forward = lambda *args, **kwargs: seen.append(kwargs["k"]) or forward(*args, **kwargs)
    for k in (1, 5, None):
        assert torch.isfinite(tr.step_fn(k)())
    assert seen == [1, 5, None]
    assert tr.cfg is cfg and tr.model.cimle_k == 3 and not hasattr(tr.model, "cfg")
