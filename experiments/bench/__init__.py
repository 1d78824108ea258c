"""Training-step benchmark: LS, cIMLE at several k and the Masked VAE on the same model.

    python -m experiments.bench --config experiments/configs/cpu-small.yaml --k 1,8 --out /tmp/bench.json

Every variant runs the training loop's own step on a fixed synthetic batch, timed round-robin so that load from
other processes hits all variants alike; what the JSON holds is in docs/performance.md.
"""

from experiments.bench.run import main, run_bench

__all__ = ["main", "run_bench"]
