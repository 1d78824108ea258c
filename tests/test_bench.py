"""Smoke test of ``python -m experiments.bench``: JSON structure and finite positive ratios (no timing assertions)."""

import argparse
import json
import math

import pytest
import torch

from conftest import one_error_line
from experiments.bench.cli import _int_list
from experiments.bench.cli import main as bench_main
from experiments.bench.settings import with_changes
from experiments.bench.variants import Trainer
from study.config import load_config

TINY = [
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
    "model.decoder_dim=16", "model.decoder_depth=2", "model.decoder_heads=2", "noise.dim=4", "mask.ratio=0.5",
]


def _is_pos(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _run(tmp_path, *extra, precision="fp32"):
    out = tmp_path / "bench.json"
    argv = []
    for item in TINY:
        argv += ["--set", item]
    argv += ["--batch", "4", "--k", "1,2", "--steps", "2", "--warmup", "1", "--late-k", "2",
             "--selection-k", "2,4", "--selection-chunk", "1,2", "--precision", precision, "--out", str(out),
             "--peak-shapes", "256x256x256", *extra]  # the default shapes take minutes in bf16 on a CPU without it
    assert bench_main(argv) == 0
    res = json.loads(out.read_text())
    assert res["schema"] == 2 and list(res["precisions"]) == precision.split(",")
    return res


def _check_common(res):
    """One precision's report."""
    for key in ("config", "settings", "environment", "rows", "components", "cimle_vs_cost_model", "cimle_vs_ls",
                "late_noise", "selection_memory", "parameters", "targets", "robust_ratios"):
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
    # late noise at the input, at the last decoder block (depth 2 -> blocks 0 and 1) and in the token-wise head
    assert [r["noise_block"] for r in res["late_noise"]] == [0, 1, "head"]
    for r in res["late_noise"]:
        assert _is_pos(r["vs_ls"]) and _is_pos(r["vs_cost_model"]) and r["k"] == 2
    sel = res["selection_memory"]
    assert {(r["k"], r["chunk"]) for r in sel["rows"]} == {(2, 1), (2, 2), (4, 1), (4, 2)}
    assert all(_is_pos(r["peak_bytes"]) for r in sel["rows"])
    assert isinstance(sel["verdict"]["grows_with_chunk_not_k"], bool)
    eff = res["efficiency"]
    assert _is_pos(eff["matmul_peak"]["flop_per_s"]) and eff["matmul_peak"]["precision"] == res["settings"]["precision"]
    flops = {name: r["flops"] for name, r in eff["rows"].items()}
    # counted, so cIMLE's extra no-grad decodes show: LS < cIMLE k=1 < cIMLE k=2
    assert 0 < flops["ls"] < flops["cimle k=1"] < flops["cimle k=2"]
    for r in res["rows"]:
        assert _is_pos(r["achieved_flop_per_s"]) and 0 < r["peak_share"] == pytest.approx(
            r["flops"] / r["step_s"] / eff["matmul_peak"]["flop_per_s"])


def test_bench_without_transformers(tmp_path):
    res = _run(tmp_path, "--no-transformers")["precisions"]["fp32"]
    _check_common(res)
    assert res["ours_vs_transformers"] is None and "transformers" not in res["parameters"]


def test_bench_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    full = _run(tmp_path, precision="fp32,bf16")
    for precision in ("fp32", "bf16"):
        _check_common(full["precisions"][precision])
    speedups = full["across_precisions"]["speedup"]["bf16"]
    assert full["across_precisions"]["reference"] == "fp32"
    assert {"ls", "transformers ViTMAE"} <= set(speedups) and all(
        _is_pos(v["speedup"]) and _is_pos(v["speedup_paired"]) for v in speedups.values())
    assert isinstance(full["targets"]["ls bf16 vs fp32 speedup >= 3.5"], bool)
    res = full["precisions"]["fp32"]
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
    assert tr.cfg is cfg and tr.model.method.cfg.cimle.k == 3 and not hasattr(tr.model, "cfg")


def test_step_flops_counts_forward_and_backward_matmuls_and_cpu_attention():
    from experiments.bench.flops import step_flops

    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8, requires_grad=True)
    assert step_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 16 * 8 * 4  # forward, grad input, grad weight
    q = torch.randn(2, 3, 5, 4)  # [B, H, N, d]
    flops = step_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 3 * 5 * 5 * 4)  # q k^T and attn v: 2 FLOPs per multiply-add each


def test_matmul_peak_is_measured_at_the_precision():
    from experiments.bench.flops import matmul_peak

    for precision in ("fp32", "bf16"):
        peak = matmul_peak(precision, torch.device("cpu"), shapes=((64, 64, 64), (32, 64, 16)), min_seconds=0.01)
        assert peak["precision"] == precision and _is_pos(peak["flop_per_s"])
        assert peak["flop_per_s"] == max(s["flop_per_s"] for s in peak["shapes"])


def test_bench_refuses_fp16_on_cpu(capsys):
    argv = [*[a for item in TINY for a in ("--set", item)], "--precision", "fp32,fp16", "--no-transformers"]
    one_error_line(capsys, bench_main(argv), "fp16 needs CUDA")


@pytest.mark.parametrize("argv, word", [(["--steps", "0"], "--steps"), (["--k", "0,2"], "--k"),
                                        (["--set", "model.depth=0"], "model.depth"),
                                        (["--late-blocks", "9"], "late noise blocks"),
                                        (["--peak-shapes", "256x256"], "--peak-shapes")])
def test_a_bench_mistake_is_one_error_line(capsys, argv, word):
    one_error_line(capsys, bench_main([*[a for item in TINY for a in ("--set", item)], "--no-transformers", *argv]),
                   word)


def test_the_bench_step_is_the_training_loops():
    """One bench step moves the weights exactly as study.step.train_step does from the same state."""
    from study.models import build_model
    from study.runtime import seed_everything
    from study.step import train_step, training_state

    cfg = with_changes(load_config(None, TINY), optim={"batch_size": 2})
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
