"""One command line for the study: ``python -m study <command> ...`` (``--help`` lists the commands).

Every command that takes a config accepts ``--set key.sub=value`` overrides;
invalid values fail before any work with a message naming the field. A
mistake the user can fix ends with one line ``error: ...`` and exit status 2,
so that scripts can tell it from a crash; ``--debug`` shows the traceback
instead. The training-step benchmark is not part of the package
(``python -m experiments.bench``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from study.utils.args import OneLineParser, config_value, int_at_least, nonnegative_int, positive_int, seed_list
from study.config import load_config
from study.utils.errors import UserError, run_command, run_parsed


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML file, e.g. experiments/configs/cpu-small.yaml (default: the dataclass defaults of "
                        "study/config.py, an MNIST ViT of cpu-small's size but not its tuned recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set objective=cimle --set cimle.k=8 (repeatable)")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from study.evaluation.monitor import monitor_hooks
    from study.train.loop import pretrain

    cfg = load_config(args.config, args.overrides)
    pretrain(cfg, args.out, resume=args.resume, progress=not args.quiet, epoch_hooks=monitor_hooks(cfg))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from study.cli.submit import slurm_available, slurm_options, submit
    from study.evaluation.monitor import monitor_hooks
    from study.train.loop import pretrain

    cfg = load_config(args.config, args.overrides)
    options = slurm_options(args.slurm_option)  # a malformed one stops before anything runs
    if args.local:
        # exactly one process, in the foreground: what each SLURM task would run, without DDP
        pretrain(cfg, args.out, resume=True, progress=True, epoch_hooks=monitor_hooks(cfg))
        return 0
    if not slurm_available():
        raise UserError("submit needs SLURM, and sbatch/srun are not on this machine; to train here run "
                        f"'python -m study pretrain --out {args.out} ...' (one process), 'torchrun "
                        f"--nproc_per_node N -m study pretrain --out {args.out} ...' (N GPUs), or "
                        "'submit --local' (one process, in the foreground)")
    job, folder = submit(cfg, args.out, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         partition=args.partition, timeout_min=args.timeout_min, slurm_folder=args.slurm_folder,
                         account=args.account, qos=args.qos, constraint=args.constraint,
                         cpus_per_task=args.cpus_per_task, options=options)
    logs = str(folder).replace("%j", str(job.job_id))
    print(f"submitted job {job.job_id}; logs in {logs} (rank 0's output: {job.paths.stdout.name}, "
          f"{job.paths.stderr.name})")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from study.utils.signals import sigterm_raises
    from study.studies.sweep import load_sweep, run_sweeps

    sweeps = [load_sweep(path, write_committed=args.write_committed, report_only=args.report_only)
              for path in args.sweep]
    if args.submit:
        return _submit_sweep(sweeps, args)
    if args.report_only:
        from study.studies.reports import build_report

        for sweep in sweeps:  # a failure is one line naming the notebook and the table (a failing cell: exit 1)
            print(f"report: {build_report(sweep)}")
        return 0
    with sigterm_raises():
        summaries = run_sweeps(sweeps, parallel=args.parallel, gpus=args.gpus, report=not args.no_report,
                               seeds=args.seeds, only=args.only, prune=args.prune)
    return 1 if any(s["failed"] or s.get("report_error") for s in summaries) else 0


def _submit_sweep(sweeps: list, args: argparse.Namespace) -> int:
    from study.cli.submit import slurm_options, submit_sweep
    from study.studies.sweep import pending_points

    options = slurm_options(args.slurm_option)
    jobs = [(sweep, point) for sweep in sweeps for point in pending_points(sweep, args.seeds, args.only)]
    if not jobs:
        print("nothing to submit: every point picked is done")
        return 0
    submitted, folder = submit_sweep(jobs, gpus_per_point=args.gpus_per_point, cpus_per_task=args.cpus_per_task,
                                     timeout_min=args.timeout_min, partition=args.partition, account=args.account,
                                     qos=args.qos, constraint=args.constraint, options=options)
    array = submitted[0].job_id.split("_")[0]
    print(f"submitted array job {array}: {len(jobs)} task(s), one per point; logs in {folder} (%j = {array}_TASK); "
          f"once they end, run 'python -m study sweep {' '.join(args.sweep)}' to merge their rows and build the report")
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from study.data.datasets import build_eval_datasets
    from study.data.packed import PackError, pack_folder, pack_size_text

    cfg = load_config(args.config, args.overrides)
    dst = args.dst or cfg.data.packed
    if not dst:
        raise PackError("pack needs --dst FOLDER (or data.packed in the config): where to write the pack")
    if cfg.data.name not in ("imagefolder", "imagenet100"):
        raise PackError(f"pack reads image folders; data.name={cfg.data.name!r} is held in memory already")
    # the whole training split: data.subset picks its images from the pack as from the folder
    train, _ = build_eval_datasets(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, subset=None)))
    workers = cfg.data.num_workers if args.workers is None else args.workers
    print(f"packing {len(train)} images of {train.root} at {args.size} x {args.size} into {dst} "
          f"({pack_size_text(len(train), args.size)})", flush=True)
    out = pack_folder(train, dst, args.size, num_workers=workers, overwrite=args.overwrite)
    print(f"packed into {out}; train with --set data.packed={out}")
    return 0


def _cmd_bench_data(args: argparse.Namespace) -> int:
    from study.data.throughput import run_from_args

    return run_from_args(args)


def _add_pack_parser(sub) -> None:
    p = sub.add_parser("pack", help="decode the config's training split once into a packed uint8 store")
    _add_config_args(p)
    p.add_argument("--dst", default=None, help="pack folder to write (default: the config's data.packed)")
    p.add_argument("--size", type=int_at_least(16), default=256,
                   help="side of the stored images in pixels, >= 16 (default 256)")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="decoding processes (default: data.num_workers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack at --dst")
    p.set_defaults(func=_cmd_pack)


def _add_slurm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument("--account", default=None, help="SLURM account to charge (sbatch --account)")
    p.add_argument("--qos", default=None, help="SLURM quality of service (sbatch --qos)")
    p.add_argument("--constraint", default=None, help="SLURM node features, e.g. a100 (sbatch --constraint)")
    p.add_argument("--cpus-per-task", type=positive_int, default=None,
                   help="CPUs per task (default: data.num_workers + 1, the loader's workers and the trainer)")
    p.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option by its long name, e.g. mail-type=END (repeatable)")


def _add_submit_parser(sub) -> None:
    p = sub.add_parser("submit", help="pretrain on SLURM via submitit (torchrun-equivalent DDP)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder (as for pretrain)")
    p.add_argument("--nodes", type=positive_int, default=1, help="SLURM nodes (default 1)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs, one process each, per node (default 8)")
    p.add_argument("--timeout-min", type=positive_int, default=72 * 60,
                   help="job time limit in minutes (default 4320); a requeued job resumes from its checkpoint")
    p.add_argument("--slurm-folder", default=None,
                   help="submitit's logs, %%j = job id (default: OUT/slurm/%%j)")
    _add_slurm_args(p)
    p.add_argument("--local", action="store_true",
                   help="no SLURM: run the job here, as one process in the foreground (resumes a run in --out)")
    p.set_defaults(func=_cmd_submit)


def _add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a sweep's grid with papermill, then its report notebook")
    p.add_argument("sweep", nargs="+", help="sweep file(s), e.g. experiments/sweeps/mask_strength_cpu.yaml; the "
                                            "points of several share one pool, the longest first")
    p.add_argument("--parallel", type=positive_int, default=None, help="points run at once (default: the file's)")
    p.add_argument("--gpus", default=None,
                   help="GPUs for the points, one point per GPU: 'auto' (all visible) or indices such as 0,1,2,3 "
                        "(default: the sweep file's gpus; none: CPU)")
    p.add_argument("--no-report", action="store_true", help="skip the report notebook")
    p.add_argument("--seeds", type=seed_list, default=None,
                   help="run only these of the file's seeds, e.g. 3,4 (the other seeds' rows are kept)")
    p.add_argument("--only", type=config_value, action="append", default=[], metavar="KEY=VALUE",
                   help="run only the points whose config has this value, e.g. objective=cimle (repeat to "
                        "narrow; the other points' rows are kept)")
    p.add_argument("--report-only", action="store_true",
                   help="run no points: rebuild reports/<sweep>.ipynb from the sweep's results table")
    p.add_argument("--prune", action="store_true",
                   help="drop the table's rows of points that the grid no longer has (default: keep them)")
    p.add_argument("--write-committed", action="store_true",
                   help="let a sweep file that git does not track write the committed table, report and figures "
                        "it names (default: it writes under runs/<name>/)")
    p.add_argument("--submit", action="store_true",
                   help="send the points to run to SLURM as one job array, a task per point; a later plain run "
                        "merges their rows and builds the report")
    p.add_argument("--gpus-per-point", type=nonnegative_int, default=0, help="with --submit: GPUs per task (default 0)")
    p.add_argument("--timeout-min", type=positive_int, default=24 * 60,
                   help="with --submit: each task's time limit in minutes (default 1440)")
    _add_slurm_args(p)
    p.set_defaults(func=_cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m study", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain one configuration")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, metrics.jsonl, config.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint; the config must be the run's, "
                        "except --set epochs=N with a larger N, which extends the run (the lr schedule is the "
                        "one of the new length, taken up at the epoch reached)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch print")
    p.set_defaults(func=_cmd_pretrain)

    from study.cli.evaluate import add_arguments as add_evaluate_arguments, run_from_args as evaluate_from_args

    p = sub.add_parser("evaluate", help="evaluate a checkpoint (k-NN, linear probe, finetune, samples)")
    add_evaluate_arguments(p)
    p.set_defaults(func=evaluate_from_args)

    _add_submit_parser(sub)

    _add_sweep_parser(sub)

    from study.evaluation.export import add_arguments as add_export_arguments, run_from_args as export_from_args

    p = sub.add_parser("export", help="export the encoder to timm or transformers (config.json + safetensors)")
    add_export_arguments(p)
    p.set_defaults(func=export_from_args)

    _add_pack_parser(sub)

    from study.data.throughput import add_arguments as add_bench_data_arguments

    p = sub.add_parser("bench-data", help="images/s per CPU core: folder pipeline vs packed store")
    _add_config_args(p)
    add_bench_data_arguments(p)
    p.set_defaults(func=_cmd_bench_data)

    # parsed by study.data.imagenet100 itself (see main): listed here for --help
    sub.add_parser("build-in100", help="build ImageNet-100 from a local ImageNet-1k (--src, --dst; symlinks or --copy)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["build-in100"]:
        from study.data.imagenet100 import main as build_in100

        return run_command(lambda: build_in100(argv[1:]), debug=debug)

    def run(args: argparse.Namespace) -> int:
        args.debug = debug
        return args.func(args)

    return run_parsed(build_parser(), argv, run, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
