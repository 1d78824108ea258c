"""Optional TensorBoard view of a run: the scalars of every ``metrics.jsonl`` row, per epoch.

Turned on by ``logging.tensorboard: true`` (``--set logging.tensorboard=true``);
needs the ``tensorboard`` extra (``pip install -e '.[tensorboard]'``). Events go
to ``<run>/tensorboard/`` under ``train/<key>`` (loss, lr, images_per_sec,
data_wait_frac, seconds, train_seconds and the objective's own stats: recon;
cIMLE's dist_chosen, dist_mean and dist_gap, the mean over images of the
farthest minus the nearest of the k sample distances; Masked VAE's kl, sigma),
at step = epochs completed. Watch with ``tensorboard --logdir runs``.
"""

from __future__ import annotations

from pathlib import Path

from study.config import Config, ConfigError

__all__ = ["TensorBoardLog", "open_tensorboard", "require_tensorboard", "TENSORBOARD_DIR"]

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Writes one metrics row per call; flushed at once so a killed run loses nothing that was logged."""

    def __init__(self, log_dir: str | Path, first_step: int = 1) -> None:
        SummaryWriter = _summary_writer()
        # a resumed run redoes the epochs after its checkpoint: drop their old events, as metrics.jsonl does
        self.writer = SummaryWriter(str(log_dir), purge_step=first_step)

    def log(self, row: dict) -> None:
        step = int(row["epoch"]) + 1
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("logging.tensorboard is true but TensorBoard is not installed: "
                          "pip install -e '.[tensorboard]' (or set logging.tensorboard=false)") from None
    return SummaryWriter


def require_tensorboard(cfg: Config) -> None:
    """Stop before a run touches its folder when the log is asked for but the extra is missing."""
    if cfg.logging.tensorboard:
        _summary_writer()


def open_tensorboard(cfg: Config, run_dir: str | Path, start_epoch: int) -> TensorBoardLog | None:
    """The run's writer when ``cfg.logging.tensorboard``, else None."""
    if not cfg.logging.tensorboard:
        return None
    return TensorBoardLog(Path(run_dir) / TENSORBOARD_DIR, first_step=start_epoch + 1)
