"""Subspace tracking during warmup: sketches of ΔW, top-r bases, stability detection, basis files."""

from .basis import SubspaceBasis, check_orthonormal
from .basis_io import load_basis, save_basis
from .policy import LockDecision, LockPolicy
from .settings import LOCK_MODES, TrackerSettings, check_lock_mode
from .sketch import (
    LowRankFactors,
    default_sketch_sizes,
    draw_test_matrices,
    exact_top_subspaces,
    reconstruct_top_subspaces,
    sketch_matrix,
    subspace_similarity,
)
from .tracker import SubspaceTracker

__all__ = [
    "LOCK_MODES",
    "SubspaceBasis",
    "check_lock_mode",
    "LockDecision",
    "LockPolicy",
    "LowRankFactors",
    "SubspaceTracker",
    "TrackerSettings",
    "check_orthonormal",
    "default_sketch_sizes",
    "draw_test_matrices",
    "exact_top_subspaces",
    "load_basis",
    "reconstruct_top_subspaces",
    "save_basis",
    "sketch_matrix",
    "subspace_similarity",
]
