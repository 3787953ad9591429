"""Parameter-space and trajectory diagnostics (paper sections 3-4).

* :func:`diagnose` — streaming comparison of two checkpoints (bf16 sparsity, update density,
  principal angles, NSS, principal-mask / low-magnitude overlaps, stable rank, Hill α̂).
* :func:`trajectory_metrics` — stable rank, norm, Hill α̂ and top-K right-subspace similarity
  to the final update along a sequence of checkpoints.
* :class:`CheckpointReader` — one-tensor-at-a-time access to safetensors checkpoints.
* :mod:`.geometry` — the pure per-matrix metric functions.
"""

from .checkpoint_reader import CheckpointReader, tensor_counter
from .diagnose import compare_matrices, diagnose, format_markdown, plot_diagnostics
from .trajectory import discover_run_checkpoints, final_update_similarity, plot_trajectory, trajectory_metrics

__all__ = [
    "CheckpointReader",
    "tensor_counter",
    "compare_matrices",
    "diagnose",
    "format_markdown",
    "plot_diagnostics",
    "trajectory_metrics",
    "final_update_similarity",
    "discover_run_checkpoints",
    "plot_trajectory",
]
