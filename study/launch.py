"""SLURM submission through submitit: one task per GPU, DDP set up from SLURM's variables.

On preemption or timeout submitit requeues the job, which resumes from the
run's last checkpoint (``pretrain(..., resume=True)``).
"""

from __future__ import annotations

from pathlib import Path

from study.config import Config

__all__ = ["submit", "PretrainJob"]


class PretrainJob:
    def __init__(self, cfg: Config, out: str | Path):
        self.cfg = cfg
        self.out = str(out)

    def __call__(self) -> dict:
        import submitit

        from study.train import pretrain

        # exports RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun would
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return pretrain(self.cfg, self.out, resume=True, progress=False)

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(PretrainJob(self.cfg, self.out))


def submit(cfg: Config, out: str | Path, *, nodes: int = 1, gpus_per_node: int = 8, partition: str | None = None,
           timeout_min: int = 72 * 60, slurm_folder: str = "slurm_logs/%j", cluster: str | None = None):
    import submitit

    executor = submitit.AutoExecutor(folder=slurm_folder, cluster=cluster)
    params = dict(nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=gpus_per_node,
                  cpus_per_task=10, timeout_min=timeout_min, name=f"cimle-mae-{cfg.objective}")
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor.submit(PretrainJob(cfg, out))
