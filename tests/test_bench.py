"""Smoke test of ``python -m experiments.bench``: it runs tiny, and its JSON has the committed files' format
with finite positive figures (no timing assertions)."""

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch

import experiments.bench.run as bench_run
from conftest import one_error_line
from experiments.bench.run import main as bench_main
from experiments.bench.run import matmul_peak, step_flops
from experiments.bench.settings import int_list
from experiments.bench.variants import Trainer
from study.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
    "model.decoder_dim=16", "model.decoder_depth=2", "model.decoder_heads=2", "noise.dim=4", "mask.ratio=0.5",
]


def _is_pos(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _run(tmp_path, monkeypatch, *extra, precision="fp32"):
    # the default peak shapes take minutes in bf16 on a CPU without bf16 units
    monkeypatch.setattr(bench_run, "PEAK_SHAPES", ((256, 256, 256),))
    out = tmp_path / "bench.json"
    argv = [a for item in TINY for a in ("--set", item)]
    argv += ["--batch", "4", "--steps", "2", "--warmup", "1", "--precision", precision, "--out", str(out), *extra]
    assert bench_main(argv) == 0
    res = json.loads(out.read_text())
    assert res["schema"] == 2 and list(res["precisions"]) == precision.split(",")
    return res


def _check_common(res, ks):
    """One precision's report: what docs/performance.md and experiments/device_check.py read from it."""
    assert res["environment"]["device"] == "cpu" and res["environment"]["threads"] >= 1
    assert res["environment"]["cpu"]["model_name"] and res["environment"]["cpu"]["torch_cpu_capability"]
    assert res["settings"]["batch"] == 4 and res["settings"]["ks"] == ks
    rows = {r["name"]: r for r in res["rows"]}
    assert {"ls", "mvae", *(f"cimle k={k}" for k in ks)} <= set(rows)
    for r in res["rows"]:
        for key in ("step_s", "images_per_s", "vs_ls", "peak_bytes", "flops", "achieved_flop_per_s"):
            assert _is_pos(r[key]), (r["name"], key)
        assert r["loss_finite"] and r["peak_share"] == pytest.approx(
            r["flops"] / r["step_s"] / res["efficiency"]["matmul_peak"]["flop_per_s"])
        assert _is_pos(r.get("vs_cost_model")) == (r["objective"] == "cimle")
    # counted, so cIMLE's extra no-grad decodes show (LS predicts every patch, as MAE's does, and cIMLE the masked
    # ones only: with the noise in the head, LS can count more than cIMLE at k = 1)
    assert rows["ls"]["flops"] > 0 and rows[f"cimle k={ks[0]}"]["flops"] < rows[f"cimle k={ks[-1]}"]["flops"]
    rr = res["robust_ratios"]["paired_wall"]
    assert set(rr["cimle_vs_cost_model"]) == set(rr["cimle_vs_ls"]) == {str(k) for k in ks}
    ratios = [res["ls_vs_cost_model"], res["components"]["selection"]["vs_model"], rr["mvae_vs_ls"],
              *rr["cimle_vs_cost_model"].values(), *rr["cimle_vs_ls"].values()]
    assert all(_is_pos(v) for v in ratios), ratios
    assert all(_is_pos(r["peak_bytes"]) for r in res["selection_memory"]["rows"])
    assert "cpu_time" not in res["robust_ratios"] and "cimle_vs_ls" not in res
    peak = res["efficiency"]["matmul_peak"]
    assert _is_pos(peak["flop_per_s"]) and peak["precision"] == res["settings"]["precision"]
    # the same model: in the head LS feeds cIMLE's head z = 0; at a decoder block cIMLE adds only the bias-free
    # noise projection, which adds exactly 0 at z = 0
    params, cfg = res["parameters"], res["config"]
    extra = 0 if res["settings"]["noise_block"] == "head" else cfg["noise"]["dim"] * cfg["model"]["decoder_dim"]
    assert params["ours_cimle"]["total"] - params["ours_ls"]["total"] == extra and params["ours_ls"]["total"] > 0


def test_bench_at_the_decoder_input(tmp_path, monkeypatch):
    res = _run(tmp_path, monkeypatch, "--k", "1,2", "--selection-k", "2,4", "--selection-chunk", "1,2")
    res = res["precisions"]["fp32"]
    _check_common(res, [1, 2])
    assert {r["noise_block"] for r in res["rows"]} == {0} == {res["settings"]["noise_block"]}  # LS too, at z = 0
    sel = res["selection_memory"]
    assert {(r["k"], r["chunk"]) for r in sel["rows"]} == {(2, 1), (2, 2), (4, 1), (4, 2)}
    # the config's k = 8, all samples in one call, is not in this grid: no estimate
    assert sel["at_batch_512"]["bytes"] is None and sel["at_batch_512"]["fits_80GB"] is None


def _keys(tree, path=""):
    """Every key path of a JSON value, with list items merged and precisions and config fields left out."""
    if isinstance(tree, list):
        return set().union(*(_keys(v, path + "[]") for v in tree if isinstance(v, (dict, list))))
    if not isinstance(tree, dict) or path.endswith("/config"):
        return set()
    out = set()
    for key, value in tree.items():
        sub = f"{path}/{re.sub(r'^(fp32|bf16)$', 'P', key)}"
        out |= {sub} | _keys(value, sub)
    return out


def test_bench_writes_the_committed_format(tmp_path, monkeypatch):
    """The options of the Makefile's cpu-small lines, at fp32 and bf16, with the noise in the head: every key of
    the output is one of the committed results/bench files."""
    full = _run(tmp_path, monkeypatch, "--set", "noise.block=head", "--k", "1,8", "--selection-k", "8",
                "--selection-chunk", "1,8", precision="fp32,bf16")
    committed = set().union(*(_keys(json.loads(f.read_text())) for f in (ROOT / "results" / "bench").glob("*.json")))
    assert _keys(full) - committed == set()
    for precision in ("fp32", "bf16"):
        _check_common(full["precisions"][precision], [1, 8])
    speedups = full["across_precisions"]["speedup"]["bf16"]
    assert full["across_precisions"]["reference"] == "fp32"
    assert {"ls", "mvae", "cimle k=8"} <= set(speedups) and all(
        _is_pos(v["speedup"]) and _is_pos(v["speedup_paired"]) for v in speedups.values())
    res = full["precisions"]["fp32"]
    # the config's k = 8 and chunk (all 8 at once) are in the grid: per image, times 512
    row = next(r for r in res["selection_memory"]["rows"] if r["chunk"] == 8)
    est = res["selection_memory"]["at_batch_512"]
    assert est["bytes"] == pytest.approx(row["peak_bytes"] / 4 * 512) and est["fits_80GB"] is True
    assert {r["noise_block"] for r in res["rows"]} == {"head"}


def test_int_list():
    assert int_list("4,1, 2,2") == [1, 2, 4]
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        int_list("0,3")
    with pytest.raises(argparse.ArgumentTypeError, match="integers"):
        int_list("1,x")


def test_cimle_step_passes_k_per_call():
    """k reaches the model as an argument of each call; the trainer's config and the model stay as built."""
    cfg = load_config(None, TINY + ["cimle.k=3", "objective=cimle"])
    imgs = torch.randn(2, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    tr = Trainer(cfg, torch.device("cpu"), imgs, compile_model=False)
    seen = []
    forward = tr.model.forward
    tr.model.forward = lambda *args, **kwargs: seen.append(kwargs["k"]) or forward(*args, **kwargs)
    for k in (1, 5, None):
        assert torch.isfinite(tr.step_fn(k)())
    assert seen == [1, 5, None]
    assert tr.cfg is cfg and tr.model.method.cfg.cimle.k == 3 and not hasattr(tr.model, "cfg")


def test_step_flops_counts_forward_and_backward_matmuls_and_cpu_attention():
    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8, requires_grad=True)
    assert step_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 16 * 8 * 4  # forward, grad input, grad weight
    q = torch.randn(2, 3, 5, 4)  # [B, H, N, d]
    flops = step_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 3 * 5 * 5 * 4)  # q k^T and attn v: 2 FLOPs per multiply-add each


def test_matmul_peak_is_measured_at_the_precision():
    for precision in ("fp32", "bf16"):
        peak = matmul_peak(precision, torch.device("cpu"), shapes=((64, 64, 64), (32, 64, 16)), min_seconds=0.01)
        assert peak["precision"] == precision and _is_pos(peak["flop_per_s"])
        assert peak["flop_per_s"] == max(s["flop_per_s"] for s in peak["shapes"])


def test_bench_refuses_fp16_on_cpu(capsys):
    argv = [*[a for item in TINY for a in ("--set", item)], "--precision", "fp32,fp16"]
    one_error_line(capsys, bench_main(argv), "fp16 needs CUDA")


@pytest.mark.parametrize("argv, word", [(["--steps", "0"], "--steps"), (["--k", "0,2"], "--k"),
                                        (["--set", "model.depth=0"], "model.depth"),
                                        (["--set", "noise.block=9"], "noise.block"),
                                        (["--precision", "fp8"], "--precision")])
def test_a_bench_mistake_is_one_error_line(capsys, argv, word):
    one_error_line(capsys, bench_main([*[a for item in TINY for a in ("--set", item)], *argv]),
                   word)


def test_the_bench_step_is_the_training_loops():
    """One bench step moves the weights exactly as study.train.step.train_step does from the same state."""
    from study.methods.model import build_model
    from study.train.step import train_step, training_state
    from study.utils.device import seed_everything

    cfg = load_config(None, TINY + ["optim.batch_size=2"])
    imgs = torch.randn(2, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    tr = Trainer(cfg, torch.device("cpu"), imgs, compile_model=False)
    tr.step_fn()()
    seed_everything(cfg.seed)
    state = training_state(cfg, build_model(cfg), torch.device("cpu"))
    for p in state.model.parameters():  # the bench primes its optimizer with one step on zero gradients
        p.grad = torch.zeros_like(p)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    train_step(state, imgs)
    a, b = tr.model.state_dict(), state.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tr.optimizer.param_groups[0]["lr"] == cfg.optim.blr * 2 / 256
