"""Every random draw of a run is seeded from (run seed, step, micro-batch): a resumed run draws what the
uninterrupted one did, and evaluation draws the same samples at every evaluation of a run."""

from __future__ import annotations

__all__ = ["ACCURACY_SEED_OFFSET", "EVAL_SEED_OFFSET", "step_seed"]

#: Added to the run's seed for the held-out reverse KL's sampling seeds.
EVAL_SEED_OFFSET = 1_000_003
#: Added to the run's seed for the task-accuracy samples.
ACCURACY_SEED_OFFSET = 2_000_029


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """The seed of one micro-batch: a pure function of (run seed, step), so a resumed run draws the same."""
    return (seed * 1_000_033 + step * 7_919 + micro * 104_729) % (2**31 - 1)
