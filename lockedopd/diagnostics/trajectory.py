"""Trajectory diagnostics over a sequence of checkpoints (paper section 4, Figs 4-5).

For checkpoint t with cumulative update ``ΔW_t = W_t - W_0`` (2-D matrices only):

* stable rank ``‖ΔW_t‖_F² / ‖ΔW_t‖₂²`` — median over matrices,
* update scale ``‖ΔW_t‖_F`` — total over matrices, ``sqrt(Σ ‖ΔW_t‖_F²)``,
* Hill α̂ over the top ``hill_k`` singular values of ``ΔW_t`` — median over matrices,
* subspace similarity to the final update with the top-K RIGHT singular vectors,
  ``sim(t) = (1/K)‖V_K(t)ᵀ V_K(T)‖_F²`` — mean over matrices.  When an update has numerical rank
  below K its basis is capped at the rank and the norm is divided by the larger of the two
  dimensions (see :func:`lockedopd.diagnostics.geometry.subspace_similarity`).

Streaming: for each matrix name the driver reads ``W_0`` and ``W_T`` and then each ``W_t`` in turn,
so only a few matrices are in memory at a time.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lockedopd.runtime.plotting import save_figure

from . import geometry as G
from .checkpoint_reader import INDEX_NAME, SINGLE_NAME, CheckpointReader
from .diagnose import natural_key

__all__ = [
    "trajectory_metrics",
    "final_update_similarity",
    "discover_run_checkpoints",
    "plot_trajectory",
]

_STEP_RE = re.compile(r"^step-(\d+)$")


def _reader(x) -> CheckpointReader:
    return x if isinstance(x, CheckpointReader) else CheckpointReader(x)


def _compile(include: str | None):
    try:
        return re.compile(include) if include else None
    except re.error as exc:
        raise ValueError(f"invalid --include regex {include!r}: {exc}") from None


def _median(xs):
    v = [x for x in xs if x is not None]
    return float(statistics.median(v)) if v else None


def _mean(xs):
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def _update_svd(w0: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and Vh of ``wt - w0`` in float64."""
    d = wt.to(torch.float64) - w0
    _, s, vh = torch.linalg.svd(d, full_matrices=False)
    return s, vh


def _right_basis(s: torch.Tensor, vh: torch.Tensor, k: int, shape) -> torch.Tensor:
    kk = min(k, G.numerical_rank(s, shape))
    return vh[:kk].T


def _matrix_names(r0: CheckpointReader, others: list[tuple[str, CheckpointReader]], pattern, skipped: dict):
    names = []
    for n in sorted(r0.keys(), key=natural_key):
        if pattern is not None and pattern.search(n) is None:
            continue
        if len(r0.shape(n)) != 2 or not r0.is_floating(n) or r0.numel(n) == 0:
            continue
        bad = None
        for label, r in others:
            if n not in r:
                bad = f"missing in {label}"
            elif r.shape(n) != r0.shape(n):
                bad = f"shape mismatch: base {list(r0.shape(n))} vs {label} {list(r.shape(n))}"
            if bad:
                break
        if bad:
            skipped[n] = bad
        else:
            names.append(n)
    return names


def trajectory_metrics(
    base_ckpt,
    checkpoints: list[tuple[int, str | os.PathLike]],
    final=None,
    top_k: int = 16,
    include: str | None = None,
    hill_k: int | None = None,
    progress: bool = True,
) -> dict:
    """Per-checkpoint trajectory metrics; see the module docstring.

    ``checkpoints``: ``[(step, path), ...]`` (sorted by step here).  ``final``: the checkpoint
    defining ``V_K(T)`` (default: the last one).  Returns a JSON-ready dict with ``steps``,
    ``per_step`` (one record per checkpoint), ``matrices`` (per-matrix series), ``skipped`` and
    ``settings``.
    """
    if not checkpoints:
        raise ValueError("trajectory_metrics needs at least one checkpoint")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    hill_k = top_k if hill_k is None else hill_k
    pattern = _compile(include)
    ckpts = sorted(((int(s), p) for s, p in checkpoints), key=lambda sp: sp[0])
    r0 = _reader(base_ckpt)
    readers = [_reader(p) for _, p in ckpts]
    if final is None:
        final_idx: int | None = len(ckpts) - 1
        rT = readers[-1]
    else:
        rT = _reader(final)
        final_idx = next((i for i, r in enumerate(readers) if r.path.resolve() == rT.path.resolve()), None)
    others = [(f"checkpoint step {s}", r) for (s, _), r in zip(ckpts, readers)]
    others.append(("final checkpoint", rT))
    skipped: dict[str, str] = {}
    names = _matrix_names(r0, others, pattern, skipped)

    per_matrix: dict[str, dict] = {}
    bar = tqdm(names, desc="trajectory", unit="matrix", disable=None if progress else True)
    for name in bar:
        w0 = r0.get(name).to(torch.float64)
        shape = tuple(w0.shape)
        wT = rT.get(name)
        sT, vhT = _update_svd(w0, wT)
        del wT
        vT = _right_basis(sT, vhT, top_k, shape)
        rec = {"stable_rank": [], "fro_norm": [], "hill_alpha": [], "subspace_similarity": []}
        for i, r in enumerate(readers):
            if i == final_idx:
                s, vh = sT, vhT
            else:
                wt = r.get(name)
                s, vh = _update_svd(w0, wt)
                del wt
            rec["stable_rank"].append(G.stable_rank_from_singular_values(s))
            rec["fro_norm"].append(float(torch.linalg.vector_norm(s)))
            rec["hill_alpha"].append(G.hill_alpha_from_singular_values(s, k=hill_k, shape=shape))
            rec["subspace_similarity"].append(G.subspace_similarity(_right_basis(s, vh, top_k, shape), vT))
            del s, vh
        per_matrix[name] = rec
        del w0, sT, vhT, vT
    bar.close()

    return {
        "steps": [s for s, _ in ckpts],
        "per_step": _per_step(ckpts, per_matrix),
        "matrices": per_matrix,
        "skipped": skipped,
        "settings": {
            "base": str(r0.path),
            "final": str(rT.path),
            "top_k": top_k,
            "hill_k": hill_k,
            "include": include,
            "svd_dtype": "float64",
            "subspace_similarity": "||V_a^T V_b||_F^2 / max(K_a, K_b), bases capped at numerical rank",
        },
    }


def _per_step(ckpts: list[tuple[int, Any]], per_matrix: dict[str, dict]) -> list[dict]:
    """One record per checkpoint aggregating the matrices' series: median and mean stable rank, the whole update's
    Frobenius norm, median Hill α̂, mean similarity to the final top-k subspace."""
    per_step = []
    recs = list(per_matrix.values())
    for i, (step, path) in enumerate(ckpts):
        per_step.append(
            {
                "step": step,
                "path": str(path),
                "stable_rank_median": _median(r["stable_rank"][i] for r in recs),
                "stable_rank_mean": _mean(r["stable_rank"][i] for r in recs),
                "update_fro_norm": math.sqrt(sum(r["fro_norm"][i] ** 2 for r in recs)) if recs else None,
                "hill_alpha_median": _median(r["hill_alpha"][i] for r in recs),
                "subspace_similarity_mean": _mean(r["subspace_similarity"][i] for r in recs),
                "n_matrices": len(recs),
            }
        )
    return per_step


def final_update_similarity(
    base_a, final_a, base_b, final_b, top_k: int = 16, include: str | None = None, progress: bool = True
) -> dict:
    """Per-matrix top-K right-subspace similarity of two runs' final updates (and the mean)."""
    pattern = _compile(include)
    ra0, raT, rb0, rbT = (_reader(x) for x in (base_a, final_a, base_b, final_b))
    skipped: dict[str, str] = {}
    others = [("final checkpoint", raT), ("reference base", rb0), ("reference final", rbT)]
    names = _matrix_names(ra0, others, pattern, skipped)
    sims: dict[str, float | None] = {}
    for name in tqdm(names, desc="reference", unit="matrix", disable=None if progress else True):
        shape = tuple(ra0.shape(name))
        w0 = ra0.get(name).to(torch.float64)
        s, vh = _update_svd(w0, raT.get(name))
        va = _right_basis(s, vh, top_k, shape)
        del w0, s, vh
        w0 = rb0.get(name).to(torch.float64)
        s, vh = _update_svd(w0, rbT.get(name))
        vb = _right_basis(s, vh, top_k, shape)
        del w0, s, vh
        sims[name] = G.subspace_similarity(va, vb)
    return {
        "matrices": sims,
        "mean": _mean(sims.values()),
        "skipped": skipped,
        "settings": {"top_k": top_k, "include": include},
    }


def discover_run_checkpoints(run_dir: str | os.PathLike) -> dict:
    """Find ``RUN_DIR/checkpoints/step-XXXXXX/`` model checkpoints.

    Returns ``{"base": path of step 0, "checkpoints": [(step, path), ...] (steps > 0),
    "notes": [...]}``.  Checkpoint directories without ``model.safetensors`` (or a sharded
    index), e.g. adapter-only checkpoints after the lock, are skipped with a note.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory does not exist: {run}")
    ck_root = run / "checkpoints"
    if not ck_root.is_dir():
        raise FileNotFoundError(f"no checkpoints/ directory in run {run} (expected {ck_root}/step-XXXXXX/)")
    found: list[tuple[int, Path]] = []
    notes: list[str] = []
    for d in sorted(ck_root.iterdir()):
        m = _STEP_RE.match(d.name)
        if not d.is_dir() or not m:
            continue
        if (d / SINGLE_NAME).is_file() or (d / INDEX_NAME).is_file():
            found.append((int(m.group(1)), d))
        else:
            notes.append(f"{d.name}: no {SINGLE_NAME} (adapter-only checkpoint?), skipped")
    found.sort(key=lambda sp: sp[0])
    base = next((p for s, p in found if s == 0), None)
    if base is None:
        raise FileNotFoundError(f"no initial checkpoint {ck_root}/step-000000/{SINGLE_NAME} (W_0) in run {run}")
    return {"base": base, "checkpoints": [(s, p) for s, p in found if s > 0], "notes": notes}


def plot_trajectory(result: dict, png_path: str | os.PathLike) -> Path:
    """2x2 panels vs step: stable rank (median), ‖ΔW_t‖_F, Hill α̂ (median), sim(t) (mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in result["per_step"]]

    def series(key):
        return [math.nan if r[key] is None else r[key] for r in result["per_step"]]

    panels = [
        ("stable_rank_median", "stable rank of ΔW_t (median)"),
        ("update_fro_norm", "‖ΔW_t‖_F (total)"),
        ("hill_alpha_median", "Hill α̂ (median)"),
        ("subspace_similarity_mean", f"sim(t) to final, K={result['settings'].get('top_k')}"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.ravel(), panels):
        ax.plot(steps, series(key), marker="o")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1, 1].set_ylim(0, 1.05)
    ref = result.get("reference")
    if ref and ref.get("mean") is not None:
        axes[1, 1].axhline(ref["mean"], color="tab:red", ls="--", label=f"vs reference final: {ref['mean']:.3f}")
        axes[1, 1].legend()
    fig.suptitle("Update trajectory")
    return save_figure(fig, png_path)
