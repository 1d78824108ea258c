"""SLURM submission through submitit: one task per GPU, DDP set up from SLURM's variables.

``--out`` becomes a run folder at submission (its ``config.yaml`` is written
then), so that the job, which finds submitit's logs and pickles in
``out/slurm/`` when it starts, still takes the folder for its run. On
preemption or timeout submitit requeues the job, which resumes from the run's
last checkpoint (``pretrain(..., resume=True)``). Without ``sbatch`` there
is nothing to submit to: :func:`submit` refuses rather than let submitit fall
back to its local executor, which would start one detached training process
per requested GPU on this machine. :func:`submit_sweep` sends a sweep's points to run
as one job array, a task per point, whose rows the next ``sweep`` run merges.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from study.train.checkpoint import CHECKPOINT
from study.config import Config, load_config, save_config
from study.utils.errors import UserError
from study.train.run_folder import check_run_folder
from study.train.loop import pretrain
from study.evaluation.monitor import monitor_hooks

__all__ = ["submit", "submit_sweep", "slurm_available", "slurm_options", "PretrainJob"]


class PretrainJob:
    def __init__(self, cfg: Config, out: str | Path):
        self.cfg = cfg
        self.out = str(out)

    def __call__(self) -> dict:
        import submitit  # optional (the slurm extra): imported where a job needs it

        # exports RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun would
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return pretrain(self.cfg, self.out, resume=True, progress=False, epoch_hooks=monitor_hooks(self.cfg))

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(PretrainJob(self.cfg, self.out))


def slurm_available() -> bool:
    """SLURM's client commands are on PATH (submitit needs sbatch to submit and srun in the job)."""
    return all(shutil.which(cmd) is not None for cmd in ("sbatch", "srun"))


def _claim_run_folder(cfg: Config, out: Path) -> None:
    """Make ``out`` a run before submitit writes into it, as the run's first start would.

    A run that has a checkpoint keeps its files: the job itself checks the config against the checkpoint.
    """
    if not (out / CHECKPOINT).exists():
        save_config(cfg, out / "config.yaml")


def slurm_options(pairs: list[str]) -> dict[str, str]:
    """``["mail-type=END", ...]`` as submitit's ``slurm_additional_parameters`` (sbatch's long option names)."""
    options = {}
    for pair in pairs:
        key, found, value = pair.partition("=")
        if not found or not key.strip():
            raise UserError(f"--slurm-option takes KEY=VALUE (an sbatch long option without its dashes, e.g. "
                            f"mail-type=END), got {pair!r}")
        options[key.strip().lstrip("-")] = value
    return options


LOCAL_PRETRAIN = "run 'python -m study pretrain' or 'torchrun -m study pretrain' instead"


def _require_slurm(local: str = LOCAL_PRETRAIN) -> None:
    """Without sbatch submitit would fall back to starting the job's processes here, detached: refuse, naming
    the ``local`` way to run the same work."""
    if not slurm_available():
        raise UserError(f"submit needs SLURM, and sbatch/srun are not on this machine; {local}")


def _executor(folder: Path, name: str, nodes: int, gpus_per_node: int, cpus_per_task: int, timeout_min: int,
              slurm: dict, local: str = LOCAL_PRETRAIN):
    """A submitit SLURM executor (refused without sbatch: no fallback to local processes)."""
    import submitit

    _require_slurm(local)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    named = {f"slurm_{key}": value for key, value in slurm.items() if key != "options"}
    named["slurm_additional_parameters"] = slurm.get("options")
    if gpus_per_node:  # a CPU job asks for no GPU at all rather than for zero of them
        named.update(gpus_per_node=gpus_per_node, tasks_per_node=gpus_per_node)
    executor.update_parameters(nodes=nodes, cpus_per_task=cpus_per_task, timeout_min=timeout_min, name=name,
                               **{key: value for key, value in named.items() if value})
    return executor


def submit(cfg: Config, out: str | Path, *, nodes: int = 1, gpus_per_node: int = 8, partition: str | None = None,
           timeout_min: int = 72 * 60, slurm_folder: str | Path | None = None, account: str | None = None,
           qos: str | None = None, constraint: str | None = None, cpus_per_task: int | None = None,
           options: dict[str, str] | None = None):
    """Submit the run to SLURM; returns ``(job, log folder)``. The logs go to ``out/slurm/%j`` by default.

    Each task gets ``data.num_workers`` + 1 CPUs (its loader's workers and itself) unless ``cpus_per_task`` says;
    ``options`` are further sbatch options, by long name without the dashes."""
    _require_slurm()
    _claim_run_folder(cfg, check_run_folder(out))
    folder = Path(slurm_folder) if slurm_folder is not None else Path(out) / "slurm" / "%j"
    slurm = {"partition": partition, "account": account, "qos": qos, "constraint": constraint, "options": options}
    executor = _executor(folder, f"cimle-mae-{cfg.objective}", nodes, gpus_per_node,
                         cpus_per_task or cfg.data.num_workers + 1, timeout_min, slurm)
    return executor.submit(PretrainJob(cfg, out)), folder


def submit_sweep(jobs: list, *, gpus_per_point: int = 0, cpus_per_task: int | None = None,
                 timeout_min: int = 24 * 60, slurm_folder: str | Path | None = None, **slurm):
    """Send ``(sweep, point)`` pairs to SLURM as one job array, a task per point running it as the sweep's own
    workers do (:func:`study.studies.points.run_point`); returns ``(jobs, log folder)``. Rows stay in each point's
    folder until the next ``sweep`` run merges them into the table, as after a stopped sweep."""
    from study.studies.points import run_point

    first = jobs[0][0]
    folder = (Path(slurm_folder) if slurm_folder is not None
              else first.path(first.runs_dir) / first.name / "slurm" / "%j")
    cfg = load_config(first.path(first.config))
    executor = _executor(folder, f"sweep-{first.name}", 1, gpus_per_point, cpus_per_task or cfg.data.num_workers + 1,
                         timeout_min, slurm, local="run the sweep here without --submit")
    return executor.map_array(run_point, [sweep for sweep, _ in jobs], [point for _, point in jobs]), folder
