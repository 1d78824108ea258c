"""The report as text: the table printed on stdout after a run (times in ms, memory in MiB, ratios)."""

from __future__ import annotations

__all__ = ["format_table"]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _kv(d: dict) -> str:
    return "  ".join(f"k={k}: {_num(v)}" for k, v in d.items())


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _row_lines(res: dict) -> list[str]:
    env, st = res["environment"], res["settings"]
    cpu = env.get("cpu") or {}
    where = env["device_name"] if env["device"] != "cpu" or not cpu else \
        f"{cpu['model_name']}, {cpu.get('family_model', '?')}, {'+'.join(cpu['features']) or 'no AVX2'}, " \
        f"torch ISA {cpu['torch_cpu_capability']}"
    lines = [f"device {env['device']} ({where}), torch {env['torch']}, threads {env['threads']}, "
             f"batch {st['batch']}, precision {st['precision']}, {st['steps']} rounds after {st['warmup']} warm-up"]
    head = (f"{'variant':<30} {'step ms':>9} {'img/s':>9} {'peak MiB':>9} {'vs LS':>7} {'model ms':>9} "
            f"{'meas/model':>10} {'GFLOP':>8} {'TFLOP/s':>8} {'of peak':>7}")
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        model = r.get("cost_model_s")
        model_txt = "" if model is None else f"{1e3 * model:9.2f}"
        ratio = r.get("vs_cost_model")
        ratio_txt = "" if ratio is None else f"{ratio:10.2f}"
        lines.append(
            f"{r['name']:<30} {1e3 * r['step_s']:9.2f} {r['images_per_s']:9.1f} {_fmt_bytes(r['peak_bytes']):>9} "
            f"{r['vs_ls']:7.2f} {model_txt:>9} {ratio_txt:>10} {r['flops'] / 1e9:8.2f} "
            f"{r['achieved_flop_per_s'] / 1e12:8.3f} {100 * r['peak_share']:6.1f}%"
        )
    peak = res["efficiency"]["matmul_peak"]
    lines.append(f"matmul peak at {peak['precision']} (measured in this run, best of {len(peak['shapes'])} shapes, "
                 f"{peak['threads']} threads): {peak['flop_per_s'] / 1e12:.3f} TFLOP/s at "
                 f"{'x'.join(str(d) for d in peak['best_shape'])}")
    return lines


def _ratio_lines(res: dict) -> list[str]:
    c = res["components"]
    lines = [f"components (ms): E_fb {1e3 * c['E_fb_s']:.2f}, "
             + ", ".join(f"D_fb@{b} {1e3 * v:.2f}" for b, v in c["D_fb_s"].items()) + ", "
             + ", ".join(f"D_f@{b} {1e3 * v:.2f}" for b, v in c["D_f_s"].items())
             + f", optimizer {1e3 * c['optimizer_s']:.2f}"]
    s = c["selection"]
    if s is not None:
        lines.append(f"selection k={s['k']} (no grad, chunk {s['chunk']}): {1e3 * s['seconds']:.2f} ms = "
                     f"{s['vs_model']:.2f} x (k+1) D_f")
    lines.append(f"ours LS / transformers: {_num(res['ours_vs_transformers'])}    "
                 f"LS / (E_fb + D_fb): {_num(res['ls_vs_cost_model'])}    mvae / LS: {_num(res['mvae_vs_ls'])}")
    lines.append("cimle / cost model:            " + _kv(res["cimle_vs_cost_model"]))
    lines.append("cimle / (cost model + optim):  " + _kv(res["cimle_vs_cost_model_with_optimizer"]))
    lines.append("cimle / LS:                    " + _kv(res["cimle_vs_ls"]))
    for label, rr in (("paired per round", res["robust_ratios"]["paired_wall"]),
                      ("CPU time", res["robust_ratios"]["cpu_time"])):
        lines.append(f"  {label}: ours/transformers {_num(rr.get('ours_vs_transformers'))}, "
                     f"mvae/LS {_num(rr.get('mvae_vs_ls'))}")
        lines.append("    cimle / cost model: " + _kv(rr["cimle_vs_cost_model"]))
        lines.append("    cimle / LS:         " + _kv(rr["cimle_vs_ls"]))
    return lines


def _late_and_selection_lines(res: dict) -> list[str]:
    lines = []
    if res["late_noise"]:
        lines.append("late noise:")
        for r in res["late_noise"]:
            lines.append(f"  k={r['k']} noise at block {r['noise_block']} ({r['where']}, {r['suffix_blocks']} suffix "
                         f"blocks): step {1e3 * r['step_s']:.2f} ms, vs LS {r['vs_ls']:.2f}, "
                         f"vs cost model {r['vs_cost_model']:.2f} (paired vs LS {_num(r['vs_ls_paired'])}, "
                         f"CPU time vs LS {_num(r['vs_ls_cpu_time'])})")
    sel = res["selection_memory"]
    if sel["rows"]:
        ks = sorted({r["k"] for r in sel["rows"]})
        chunks = sorted({r["chunk"] for r in sel["rows"]})
        grid = {(r["k"], r["chunk"]): r["peak_bytes"] for r in sel["rows"]}
        lines.append(f"selection peak MiB (rows k, columns chunk; {sel['method'].split(':')[0]}):")
        lines.append("  k \\ chunk " + "".join(f"{c:>9}" for c in chunks))
        for k in ks:
            lines.append(f"  {k:>9} " + "".join(f"{_fmt_bytes(grid[(k, c)]):>9}" for c in chunks))
        if "verdict" in sel:
            lines.append(f"  grows with chunk, not k: {sel['verdict']['grows_with_chunk_not_k']}")
    return lines


def _parameter_target_lines(res: dict) -> list[str]:
    p = res["parameters"]
    lines = ["parameters: ours LS {:,} (trainable {:,}), cIMLE {:,}, mvae {:,}".format(
        p["ours_ls"]["total"], p["ours_ls"]["trainable"], p["ours_cimle"]["total"], p["ours_mvae"]["total"])]
    if "transformers" in p:
        lines.append("            transformers {:,} (trainable {:,}); difference LS - transformers: {:,}".format(
            p["transformers"]["total"], p["transformers"]["trainable"], p["ls_minus_transformers"]))
    lines.append("targets (reported, not asserted):")
    for k, v in res["targets"].items():
        lines.append(f"  {k}: " + ("; ".join(f"{kk}: {vv}" for kk, vv in v.items()) if isinstance(v, dict) else str(v)))
    return lines


def _precision_table(res: dict) -> str:
    """The text summary of one precision's report (:func:`experiments.bench.report.build_report`)."""
    lines = _row_lines(res) + _ratio_lines(res) + _late_and_selection_lines(res)
    return "\n".join(lines + _parameter_target_lines(res))


def format_table(res: dict) -> str:
    """The text summary of a run (:func:`experiments.bench.precisions.combine_precisions`): each precision's table,
    then the speed-ups across precisions."""
    parts = [f"=== precision {p} ===\n" + _precision_table(rep) for p, rep in res["precisions"].items()]
    across = res["across_precisions"]
    for p, rows in across["speedup"].items():
        parts.append(f"{p} vs {across['reference']} (step speed-up; paired per round):\n" + "\n".join(
            f"  {name:<30} {_num(v['speedup'])}  ({_num(v['speedup_paired'])})" for name, v in rows.items()))
    top = {k: v for k, v in res["targets"].items() if k not in res["precisions"]}
    if top:
        parts.append("targets across precisions: " + "; ".join(f"{k}: {v}" for k, v in top.items()))
    return "\n".join(parts)
