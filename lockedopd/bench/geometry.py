"""A finished cell's update geometry, measured from its checkpoints before they are deleted (the paper's
parameter-space evidence, for experiments with ``geometry: true``).

Per checkpoint t (cumulative update ΔW_t = W_t − W_0): median stable rank, ‖ΔW_t‖_F, median Hill α̂ and the
similarity of the top-k right singular subspace to the final update (:func:`lockedopd.diagnostics.trajectory_metrics`,
what ``lockedopd trajectory`` reports). At the end, the paper's Table-1 summary of (W_0, W_T)
(:func:`lockedopd.diagnostics.diagnose`, what ``lockedopd diagnose`` reports): bf16 update sparsity, principal-angle
rotation, normalized spectral shift, principal-mask and low-magnitude overlaps. Only the aggregates are kept
(``geometry.json``: a few KiB), so they travel in the grid's archive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lockedopd.runtime.atomic_io import atomic_write_text

__all__ = ["GEOMETRY_FILE", "TABLE1_KEYS", "measure_cell_geometry"]

GEOMETRY_FILE = "geometry.json"

#: The end-of-run summary numbers kept from ``diagnose`` (the paper's Table 1 and the update's spectrum).
TABLE1_KEYS = (
    "bf16_sparsity",
    "principal_angle_max_deg",
    "nss",
    "principal_mask_overlap",
    "low_magnitude_overlap",
    "stable_rank",
    "hill_alpha",
    "update_density",
)


def measure_cell_geometry(cell: Path, top_k: int = 16) -> dict[str, Any]:
    """Measure ``cell``'s checkpoints (``checkpoints/step-000000`` is W_0) and write ``cell/geometry.json``.

    Returns:
        ``{"top_k", "per_step": [{"step", "stable_rank_median", "update_fro_norm", "hill_alpha_median",
        "subspace_similarity_mean"}, ...], "final": {TABLE1_KEYS...}, "final_step"}``.

    Raises:
        FileNotFoundError: the cell has no W_0 checkpoint or none after it.
    """
    from lockedopd.diagnostics import diagnose
    from lockedopd.diagnostics.trajectory import discover_run_checkpoints, trajectory_metrics

    found = discover_run_checkpoints(cell)
    if not found["checkpoints"]:
        raise FileNotFoundError(f"{cell} has no checkpoint after step 0; geometry needs save_steps > 0.")
    trajectory = trajectory_metrics(found["base"], found["checkpoints"], top_k=top_k, progress=False)
    keep = ("step", "stable_rank_median", "update_fro_norm", "hill_alpha_median", "subspace_similarity_mean")
    final_step, final_path = found["checkpoints"][-1]
    table = diagnose(found["base"], final_path, progress=False)["summary"]
    result = {
        "top_k": top_k,
        "per_step": [{key: record[key] for key in keep} for record in trajectory["per_step"]],
        "final": {key: table.get(key) for key in TABLE1_KEYS},
        "final_step": final_step,
    }
    atomic_write_text(cell / GEOMETRY_FILE, json.dumps(result, indent=2))
    return result
