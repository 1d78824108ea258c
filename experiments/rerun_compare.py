"""Did a rerun move the science? Each study's paired cIMLE - LS differences before and after, per seed.

    python experiments/rerun_compare.py --before <git revision> [--studies efficiency_cpu] [--out FILE.md]

A change that alters float rounding (not the maths) reruns every affected row. Each cIMLE
run then decorrelates from its old self as a run with another seed would (a near-tied
selection flips; docs/reproducibility.md), so a single row may move by seed noise. What must
not move is the comparison: for each study setting and objective, the per-seed difference
``(objective - LS)`` is formed before and after, and their change, ``after - before``, gets a
two-sided 95% t-interval over seeds. An interval that excludes 0 says the comparison moved
beyond seed noise. Only a comparison whose rows were rerun (some seed's difference changed)
can move; the counts and the chance expectation cover those alone. Studies without LS rows
(the noise-block study) compare the objective's own value per seed. The tables before are read
from git (``git show REV:results/NAME.csv``), the tables after from ``--results``.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from study.utils.errors import UserError, run_command  # noqa: E402
from study.figures.common import paired_cell  # noqa: E402
from study.utils.io import atomic_write_text  # noqa: E402
from study.evaluation.results import knn_at  # noqa: E402
from study.evaluation.statistics import PAIR_KEYS, objective_variants, t_interval  # noqa: E402

STUDIES = ("mask_strength_cpu", "efficiency_cpu", "noise_block_cpu", "synthetic_cpu", "k_axis_cpu",
           "k_axis_synthetic_cpu", "training_length_cpu")
SETTING_KEYS = PAIR_KEYS + ("synthetic_mean_shift", "synthetic_distractor", "decoder_depth")
METRICS = {"knn_top1": "k-NN", "linear_top1": "linear"}
# a 95% interval excludes 0 by chance alone in 5% of rerun comparisons that did not move
CHANCE = 0.05
UNCHANGED = 1e-9  # a per-seed difference that moved less than this was not rerun (rows read back from the table)


def _table_at(revision: str, path: str) -> pd.DataFrame:
    try:
        text = subprocess.run(["git", "show", f"{revision}:{path}"], check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        raise UserError(f"cannot read {path} at {revision!r}: {exc.stderr.strip()}") from None
    return knn_at(pd.read_csv(io.StringIO(text)))


def _wide(table: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, set[str]]:
    """Pretrained-encoder rows of the two metrics, one column per objective variant, indexed by setting and seed;
    and the variants whose noise enters in the head."""
    rows = table[(table.encoder == "pretrained") & table.metric.isin(list(METRICS))]
    variant = objective_variants(rows)
    cimle = rows.objective == "cimle"
    if rows[cimle].noise_block.astype(str).nunique() > 2:  # the noise-block study: a variant per block
        variant = variant.where(~cimle, variant + "@" + rows.noise_block.astype(str))
    if rows.k.nunique() > 1:  # the k axis: a variant per k, and LS on the head's decoder apart from the plain one
        variant = variant.where(rows.objective != "cimle", variant + " k=" + rows.k.astype(str))
        variant = variant.where((rows.objective != "ls") | (rows.noise_block.astype(str) != "head"), "ls-head")
    in_head = set(variant[rows.noise_block.astype(str) == "head"])
    rows = rows.assign(variant=variant, **{k: rows[k].astype(object).fillna("-") for k in keys})
    return rows.pivot_table(index=keys + ["seed"], columns="variant", values="value", aggfunc="first"), in_head


def _natural(variant: str) -> tuple:
    """``cimle k=4`` before ``cimle k=32``."""
    name, _, k = variant.partition(" k=")
    return (name, int(k) if k.isdigit() else -1, variant)


def compare(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per setting and objective: before, after and change of (objective - LS) per seed, mean and 95% interval."""
    keys = [k for k in SETTING_KEYS if k in before.columns and k in after.columns]
    (old, _), (new, in_head) = _wide(before, keys), _wide(after, keys)
    shared = set(old.columns) & set(new.columns)
    out = []
    for variant in sorted(shared - {"ls", "ls-head"}, key=_natural):
        # LS on the variant's own decoder: the head's (at z = 0) where the noise enters in the head and the
        # study has that LS apart from the plain one (the k axis), as study.figures.k_axis pairs them
        preferred = ("ls-head", "ls") if variant in in_head else ("ls", "ls-head")
        baseline = next((b for b in preferred if b in shared), None)
        d_old = old[variant] - (old[baseline] if baseline else 0.0)
        d_new = new[variant] - (new[baseline] if baseline else 0.0)
        both = pd.concat({"before": d_old, "after": d_new}, axis=1).dropna()
        for setting, group in both.groupby(level=keys, sort=True):
            row = dict(zip(keys, setting if isinstance(setting, tuple) else (setting,)))
            row.update(objective=variant, versus=baseline or "itself", n=len(group))
            for name, values in (("before", group.before), ("after", group.after),
                                 ("change", group.after - group.before)):
                mean, low, high = t_interval(100 * values.to_numpy())
                row.update({f"{name}": mean, f"{name}_low": low, f"{name}_high": high})
            row["rerun"] = bool(((group.after - group.before).abs() > UNCHANGED).any())
            row["moved"] = row["rerun"] and bool(row["change_low"] > 0 or row["change_high"] < 0)
            out.append(row)
    return pd.DataFrame(out)


def markdown(study: str, frame: pd.DataFrame) -> str:
    varying = [k for k in SETTING_KEYS if k in frame.columns and frame[k].nunique() > 1 and k != "metric"]
    lines = [f"### {study}", "", "| " + " | ".join(varying + ["metric", "objective", "n", "before", "after",
                                                             "change (after - before)"]) + " |",
             "|" + "---|" * (len(varying) + 6)]
    for r in frame.itertuples():
        cells = [str(getattr(r, k)) for k in varying] + [METRICS[r.metric], f"{r.objective} - {r.versus}"
                                                         if r.versus != "itself" else r.objective, str(r.n)]
        differences = r.versus != "itself"  # else the objective's own accuracy: no interval to hold against 0
        cells += [paired_cell(r.before, r.before_low, r.before_high, 1, bold=differences),
                  paired_cell(r.after, r.after_low, r.after_high, 1, bold=differences),
                  paired_cell(r.change, r.change_low, r.change_high, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    moved, rerun = int(frame.moved.sum()), int(frame.rerun.sum())
    lines += ["", f"{moved} of the {rerun} rerun comparisons moved beyond seed noise (change interval excludes 0; "
              f"at 95%, about {CHANCE * rerun:.1f} would by chance alone); {len(frame) - rerun} were not rerun.", ""]
    return "\n".join(lines)


def summary(frames: dict[str, pd.DataFrame]) -> str:
    """One row per study: its comparisons, those rerun (only they can move), those that moved beyond seed noise
    (their changes), how many chance alone moves among the rerun ones, the largest change."""
    lines = ["| study | comparisons | rerun | moved beyond seed noise | by chance alone (5% of rerun) | "
             "largest change of a mean |", "|---|---|---|---|---|---|"]
    for study, frame in frames.items():
        moved, rerun = frame[frame.moved], int(frame.rerun.sum())
        changes = ", ".join(f"{c:+.1f}" for c in moved.change)
        lines.append(f"| {study} | {len(frame)} | {rerun} | {len(moved)}{f' ({changes})' if changes else ''} | "
                     f"{CHANCE * rerun:.1f} | {frame.change.abs().max():.1f} |")
    every = pd.concat(frames.values())
    rerun = int(every.rerun.sum())
    lines.append(f"| all | {len(every)} | {rerun} | {int(every.moved.sum())} | {CHANCE * rerun:.1f} | |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="git revision whose committed tables are the rows before")
    p.add_argument("--results", type=Path, default=Path("results"), help="folder of the tables after")
    p.add_argument("--studies", default=",".join(STUDIES), help="the studies (results tables) to compare")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)

    def run() -> int:
        parts = [f"Per seed, objective - LS (a study without LS: the objective's own accuracy), in points, "
                 f"mean [95% t-interval] over seeds, in the tables at {args.before} (before) and in "
                 f"{args.results}/ (after); bold: a difference whose interval excludes 0.", ""]
        frames = {}
        for study in args.studies.split(","):
            after_path = args.results / f"{study}.csv"
            if not after_path.is_file():
                raise UserError(f"no table at {after_path}: run the study first, or pass --results")
            frames[study] = compare(_table_at(args.before, f"results/{study}.csv"),
                                    knn_at(pd.read_csv(after_path)))
        parts += [summary(frames)] + [markdown(study, frame) for study, frame in frames.items()]
        text = "\n".join(parts)
        if args.out:
            atomic_write_text(args.out, text)
        print(text)
        return 0

    return run_command(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
