"""Why cIMLE runs can fail to reproduce across machines while LS runs do (issue 10, item 3).

A local measurement tool (not part of the package): it runs a short pretraining
through ``study.train.pretrain`` with hooks that record, at every step, the loss
and (cIMLE) the k selection distances and the chosen index, and it can inject
perturbations of one float32 ulp to imitate "a different kernel somewhere":

    python experiments/repro_check.py run  --objective cimle --ratio 0.5 --epochs 5 --name c05
    python experiments/repro_check.py run  --objective cimle --ratio 0.5 --epochs 5 --name c05_ulp --perturb dist-ulp
    python experiments/repro_check.py gaps   runs/repro/c05
    python experiments/repro_check.py compare runs/repro/c05 runs/repro/c05_ulp [--verbose]
    python experiments/repro_check.py probe --out runs/repro/probe/default.pt   # one step, per ratio
    python experiments/repro_check.py probe-compare runs/repro/probe/default.pt runs/repro/probe/other.pt

Results and commands: docs/reproducibility.md.

``--perturb``:
  none       the run as ``python -m study pretrain`` does it
  init-ulp   every initial parameter moved by one ulp (random sign; LS and cIMLE alike)
  dist-ulp   every cIMLE distance moved by one ulp before the argmin (the selection only)
``--force-flip S:B:J:F`` multiplies the distance of sample J of image B at step S by F,
to make exactly one selection differ (needs ``cimle.chunk=1``, the CPU default).
``--threads N`` sets torch's intra-op threads. Kernel-dispatch experiments use the
environment instead (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS,
MKL_CBWR), which must be set before torch is imported, so on the command line.

Output: ``runs/repro/<name>/`` holds the run folder (``run/``, with checkpoint.pt
for ``python -m study evaluate``) and ``trace.pt`` (per-step losses, distances,
indices, the noise projection's norm, the final weights, the environment).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "cpu-small.yaml"


def _nudge(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``t`` with every element moved by one ulp up or down (random sign from ``gen``)."""
    up = torch.rand(t.shape, generator=gen) < 0.5
    return torch.where(up, torch.nextafter(t, torch.full_like(t, float("inf"))),
                       torch.nextafter(t, torch.full_like(t, float("-inf"))))


def _env() -> dict:
    keys = ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
            "MKL_DEBUG_CPU_TYPE")
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), **{k: os.environ.get(k) for k in keys}}


def _record_steps(trace: dict) -> None:
    """Every forward of the run appends its loss, cIMLE's selection and the noise projection's norm to ``trace``."""
    import study.models.mae as mae

    original_forward = mae.MaskedAutoencoder.forward

    def recording_forward(self, imgs, mask, *args, **kwargs):
        res = original_forward(self, imgs, mask, *args, **kwargs)
        trace["losses"].append(res.loss.detach().double().item())
        if res.selection is not None:
            trace["distances"].append(res.selection.distances.detach().clone())
            trace["index"].append(res.selection.index.detach().clone())
        proj = getattr(self.decoder, "decoder_noise_proj", None)
        if proj is not None:
            trace["noise_norm"].append(proj.weight.detach().norm().item())
        return res

    mae.MaskedAutoencoder.forward = recording_forward


def _perturb(args: argparse.Namespace, cfg, gen: torch.Generator) -> None:
    """Install the run's perturbation: last-bit noise on the initial weights or on cIMLE's distances, or one
    forced flip of a selection."""
    import study.objectives as objectives
    import study.train as train

    if args.perturb == "init-ulp":
        original_build = train.build_model  # the name the training loop calls

        def perturbed_build(cfg, **kw):
            model = original_build(cfg, **kw)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(_nudge(p, gen))
            return model

        train.build_model = perturbed_build
    elif args.perturb == "dist-ulp":
        original_dist = objectives.per_example_squared_error

        def perturbed_dist(pred, target, mask=None):
            return _nudge(original_dist(pred, target, mask), gen)

        objectives.per_example_squared_error = perturbed_dist
    if args.force_flip:
        # one selection changed on purpose: at step S, image B, sample J's distance times FACTOR
        step_s, image_b, sample_j, factor = args.force_flip.split(":")
        step_s, image_b, sample_j, factor = int(step_s), int(image_b), int(sample_j), float(factor)
        original_flip_dist = objectives.per_example_squared_error
        calls = {"n": 0}
        k = cfg.cimle.k
        if cfg.cimle.chunk != 1:
            raise SystemExit("--force-flip counts one distance call per sample: needs cimle.chunk=1")

        def flipping_dist(pred, target, mask=None):
            d = original_flip_dist(pred, target, mask)
            n = calls["n"]
            calls["n"] += 1
            if n // k == step_s and n % k == sample_j:
                d = d.clone()
                d[image_b] = d[image_b] * factor
            return d

        objectives.per_example_squared_error = flipping_dist


def cmd_run(args: argparse.Namespace) -> None:
    from study.config import load_config
    from study.train import pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"objective={args.objective}", f"mask.ratio={args.ratio}", f"epochs={args.epochs}",
                 f"seed={args.seed}", f"optim.warmup_epochs={args.warmup}", *args.set]
    cfg = load_config(CONFIG, overrides)
    out = ROOT / "runs" / "repro" / args.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    trace: dict = {"losses": [], "distances": [], "index": [], "noise_norm": []}
    _record_steps(trace)
    _perturb(args, cfg, torch.Generator().manual_seed(12345))  # the perturbations' own stream
    last = pretrain(cfg, out / "run", progress=False)
    state = torch.load(out / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    trace["final"] = {k: v.clone() for k, v in state.items()}
    trace["last"] = last
    trace["env"] = _env()
    trace["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    if trace["distances"]:
        trace["distances"] = torch.stack(trace["distances"])  # [steps, B, k]
        trace["index"] = torch.stack(trace["index"])  # [steps, B]
    torch.save(trace, out / "trace.pt")
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in trace["final"].values())).hexdigest()[:16]
    print(json.dumps({"name": args.name, "steps": len(trace["losses"]), "final_loss": trace["losses"][-1],
                      "weights_sha": digest, "env": trace["env"]}))


def _load(path: str) -> dict:
    import __main__
    __main__.cmd_run = cmd_run  # traces written before args were stored without the function
    return torch.load(Path(path) / "trace.pt", map_location="cpu", weights_only=False)


def gap_stats(distances: torch.Tensor) -> dict:
    """Near-tie statistics of the selections in ``distances [steps, B, k]`` (float32 as ranked)."""
    d = distances.double()
    s = d.sort(dim=-1).values
    d1, d2 = s[..., 0], s[..., 1]
    rel = ((d2 - d1) / d1.clamp_min(1e-30)).flatten()
    ulp = (d2 - d1) / (torch.nextafter(distances.sort(dim=-1).values[..., 0],
                                       torch.tensor(float("inf"))).double() - d1)
    spread = ((s[..., -1] - d1) / d1.clamp_min(1e-30)).flatten()
    out = {"selections": rel.numel()}
    for t in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
        out[f"rel_gap<{t:g}"] = float((rel < t).double().mean())
    out["exact_ties"] = float((rel == 0).double().mean())
    out["gap<=4ulp"] = float((ulp.flatten() <= 4).double().mean())
    out["median_rel_gap"] = float(rel.median())
    out["median_rel_spread"] = float(spread.median())
    return out


def cmd_gaps(args: argparse.Namespace) -> None:
    for path in args.runs:
        tr = _load(path)
        row = {"run": Path(path).name}
        if isinstance(tr["distances"], torch.Tensor):
            dist = tr["distances"]
            steps = dist.shape[0]
            row.update(gap_stats(dist))
            if args.last:
                row["last_epochs"] = {k: v for k, v in gap_stats(dist[-args.last:]).items()}
            row["noise_proj_norm_first_last"] = [tr["noise_norm"][0], tr["noise_norm"][-1]]
            row["steps"] = steps
        row["dist_gap_last_epoch"] = tr["last"].get("dist_gap")
        row["dist_mean_last_epoch"] = tr["last"].get("dist_mean")
        print(json.dumps(row))


def compare(a: dict, b: dict, verbose: bool = False) -> dict:
    la, lb = np.array(a["losses"]), np.array(b["losses"])
    n = min(len(la), len(lb))
    differ = np.nonzero(la[:n] != lb[:n])[0]
    out = {"steps": n, "first_loss_diff_step": int(differ[0]) if len(differ) else None,
           "max_rel_loss_diff": float(np.max(np.abs(la[:n] - lb[:n]) / np.abs(la[:n])))}
    if isinstance(a["index"], torch.Tensor) and isinstance(b["index"], torch.Tensor):
        flips = (a["index"][:n] != b["index"][:n]).sum(dim=1)  # [steps]
        nz = torch.nonzero(flips).flatten()
        out["first_flip_step"] = int(nz[0]) if len(nz) else None
        out["flipped_selections"] = int(flips.sum())
        out["flipped_first_step"] = int(flips[nz[0]]) if len(nz) else 0
        # how close the run came to a flip before the first one: per selection, the best-vs-second gap in A
        # against the change of that gap between A and B (a flip needs change > gap)
        end = int(nz[0]) if len(nz) else n
        if end > 0:
            da, db = a["distances"][:end].double(), b["distances"][:end].double()
            rel_change = ((da - db).abs() / da)  # [steps, B, k]
            out["dist_rel_change_median_first_last"] = [float(rel_change[0].median()), float(rel_change[-1].median())]
            out["dist_rel_change_max_first_last"] = [float(rel_change[0].max()), float(rel_change[-1].max())]
            s = da.sort(dim=-1)
            gap = s.values[..., 1] - s.values[..., 0]  # [steps, B]
            ib = db.gather(-1, s.indices[..., :2])  # B's distances of A's best and second
            change = ((ib[..., 1] - ib[..., 0]) - gap).abs()
            ratio = gap / change.clamp_min(1e-30)
            out["min_gap_over_change"] = float(ratio.min())
            out["selections_gap_lt_10x_change"] = int((ratio < 10).sum())
            if verbose:
                for st, bb in (ratio < 10).nonzero().tolist():
                    print(f"  step {st} image {bb}: A {a['distances'][st, bb].tolist()} -> {int(a['index'][st, bb])}; "
                          f"B {b['distances'][st, bb].tolist()} -> {int(b['index'][st, bb])}")
    num = den = 0.0
    identical = True
    for key, va in a["final"].items():
        vb = b["final"][key]
        identical &= bool(torch.equal(va, vb))
        num += float((va.double() - vb.double()).pow(2).sum())
        den += float(va.double().pow(2).sum())
    out["weights_identical"] = identical
    out["weights_rel_l2_diff"] = (num / den) ** 0.5
    return out


def cmd_compare(args: argparse.Namespace) -> None:
    ref = _load(args.reference)
    for path in args.others:
        print(json.dumps({"a": Path(args.reference).name, "b": Path(path).name, **compare(ref, _load(path), args.verbose)}))


def cmd_probe(args: argparse.Namespace) -> None:
    """One forward + backward per (objective, ratio) on one fixed batch; saves loss, grads, distances.

    Run it under different environments and ``--compare`` the files: which computations change."""
    from study.config import load_config
    from study.data import build_datasets
    from study.masking import build_mask_generator
    from study.models import build_model

    out = {"env": _env(), "cases": {}}
    for objective in ("ls", "cimle"):
        for ratio in args.ratios:
            cfg = load_config(CONFIG, [f"objective={objective}", f"mask.ratio={ratio}", "seed=0"])
            torch.manual_seed(0)
            train_set, _ = build_datasets(cfg)
            imgs = torch.stack([train_set[i][0] for i in range(cfg.optim.batch_size)])
            torch.manual_seed(0)
            model = build_model(cfg)
            gen = torch.Generator().manual_seed(0)
            grid = cfg.patch_grid
            mask = build_mask_generator(cfg.mask, grid)(imgs.shape[0], generator=gen, device=torch.device("cpu"))
            res = model(imgs, mask, generator=gen)
            res.loss.backward()
            case = {"loss": res.loss.detach().clone(),
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
            if res.selection is not None:
                case["distances"] = res.selection.distances.clone()
            out["cases"][f"{objective}@{ratio}"] = case
    torch.save(out, args.out)
    print(json.dumps(out["env"]))


def cmd_probe_compare(args: argparse.Namespace) -> None:
    ref = torch.load(args.reference, weights_only=False)
    for path in args.others:
        other = torch.load(path, weights_only=False)
        for key, a in ref["cases"].items():
            if key not in other["cases"]:
                continue
            b = other["cases"][key]
            diff_grads = [n for n in a["grads"] if not torch.equal(a["grads"][n], b["grads"][n])]
            row = {"a": Path(args.reference).stem, "b": Path(path).stem, "case": key,
                   "loss_equal": bool(torch.equal(a["loss"], b["loss"])),
                   "grads_differ": f"{len(diff_grads)}/{len(a['grads'])}"}
            if diff_grads:
                rel = max(float(((a["grads"][n] - b["grads"][n]).abs().max() / a["grads"][n].abs().max()))
                          for n in diff_grads)
                row["max_rel_grad_diff"] = rel
                row["first_differing"] = diff_grads[:3]
            if "distances" in a:
                da, db = a["distances"].double(), b["distances"].double()
                row["dist_equal"] = bool(torch.equal(a["distances"], b["distances"]))
                row["max_rel_dist_diff"] = float(((da - db).abs() / da).max())
                row["index_flips"] = int((a["distances"].argmin(1) != b["distances"].argmin(1)).sum())
            print(json.dumps(row))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--objective", default="cimle", choices=["ls", "cimle"])
    r.add_argument("--ratio", type=float, default=0.5)
    r.add_argument("--epochs", type=int, default=5)
    r.add_argument("--warmup", type=int, default=4, help="optim.warmup_epochs (the sweep uses 4)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as OMP_NUM_THREADS)")
    r.add_argument("--perturb", default="none", choices=["none", "init-ulp", "dist-ulp"])
    r.add_argument("--force-flip", default="", metavar="S:B:J:FACTOR",
                   help="multiply the distance of sample J of image B at step S by FACTOR (forces one flip)")
    r.add_argument("--set", action="append", default=[], help="extra config override key=value")
    r.set_defaults(func=cmd_run)
    g = sub.add_parser("gaps")
    g.add_argument("runs", nargs="+")
    g.add_argument("--last", type=int, default=0, help="also the statistics of the last N steps")
    g.set_defaults(func=cmd_gaps)
    c = sub.add_parser("compare")
    c.add_argument("reference")
    c.add_argument("others", nargs="+")
    c.add_argument("--verbose", action="store_true", help="print the near-flips")
    c.set_defaults(func=cmd_compare)
    q = sub.add_parser("probe")
    q.add_argument("--out", required=True)
    q.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    q.set_defaults(func=cmd_probe)
    q = sub.add_parser("probe-compare")
    q.add_argument("reference")
    q.add_argument("others", nargs="+")
    q.set_defaults(func=cmd_probe_compare)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
