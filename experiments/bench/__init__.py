"""Training-step benchmark: LS, cIMLE at several k and the Masked VAE, against transformers' ViTMAE.

    python -m experiments.bench --config experiments/configs/cpu-small.yaml --k 1,8 --out /tmp/bench.json

Every step is :func:`study.train.step.train_step` on a fixed synthetic batch, timed round-robin (one step of
each variant, then the next round) at each ``--precision``; what the JSON holds is in docs/performance.md.
Modules: ``settings`` (arguments, plans), ``variants`` (what is timed), ``memory`` (peak memory), ``run``
(the stages, FLOPs, the matmul peak, the timing) and ``report`` (the JSON and the printed table).
"""

from experiments.bench.run import main, run_bench

__all__ = ["main", "run_bench"]
