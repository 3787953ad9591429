"""Streaming parameter-space diagnostics between two checkpoints (paper section 3, Table 1, Figs 2-3).

``diagnose(base, ft)`` walks the tensors of the base checkpoint one at a time, loads the matching
fine-tuned tensor, computes the per-tensor metrics and drops both before moving on: peak memory is
two checkpoint tensors plus their float64 SVD work space, never a whole model.

Choices where the paper leaves one (all recorded under ``result["settings"]``):

* ``M_upd`` (the update mask of both overlap metrics) is by default the complement of the
  η-"unchanged" mask used for bf16 sparsity (``update_mask="eta"``); ``update_mask="exact"``
  uses the exact bf16 inequality of update density instead.
* Summary overlaps are count-weighted, ``Σ|M ∩ M_upd| / Σ|M_upd|`` over matrices (matrices with
  empty ``M_upd`` contribute nothing; ``None`` if no matrix changed); the unweighted mean over
  matrices with a non-empty ``M_upd`` is reported as ``*_overlap_mean``.
* ``bf16_sparsity``: count-weighted over every floating tensor present in both checkpoints with
  equal shape (1-D ones included); ``update_density`` count-weighted over 2-D matrices;
  ``nss`` and ``principal_angle_max_deg`` unweighted means over matrices; ``stable_rank`` (and
  ``hill_alpha``) medians over matrices where defined.
* Tensors missing on one side, with different shapes, non-floating (integer buffers) or empty go
  to ``result["skipped"]`` with the reason.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lockedopd.runtime.plotting import save_figure

from . import geometry as G
from .checkpoint_reader import CheckpointReader

__all__ = ["diagnose", "compare_matrices", "format_markdown", "plot_diagnostics", "layer_of"]

SUMMARY_KEYS = (
    "bf16_sparsity",
    "update_density",
    "principal_mask_overlap",
    "low_magnitude_overlap",
    "principal_angle_max_deg",
    "nss",
    "stable_rank",
    "n_matrices",
    "n_params",
)


def natural_key(name: str) -> tuple:
    """Sort key ordering ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def _reader(x: str | os.PathLike | CheckpointReader) -> CheckpointReader:
    return x if isinstance(x, CheckpointReader) else CheckpointReader(x)


def compare_matrices(
    w0: torch.Tensor,
    w1: torch.Tensor,
    k: int = 512,
    eta: float = 1e-3,
    mask_rank: int = 64,
    alpha: float = 0.3,
    hill_k: int = 16,
    update_mask: str = "eta",
) -> dict:
    """All per-matrix metrics for one 2-D pair (plus the counts the summary needs)."""
    if w0.dim() != 2 or w0.shape != w1.shape:
        raise ValueError(f"compare_matrices needs two 2-D tensors of equal shape, got {w0.shape} / {w1.shape}")
    numel = w0.numel()
    unchanged = G.bf16_unchanged_mask(w0, w1, eta)
    n_unchanged = int(unchanged.sum())
    exact = G.bf16_exact_changed_mask(w0, w1)
    n_exact = int(exact.sum())
    if update_mask == "eta":
        upd = ~unchanged
        del exact
    elif update_mask == "exact":
        upd = exact
    else:
        raise ValueError(f"update_mask must be 'eta' or 'exact', got {update_mask!r}")
    del unchanged
    n_upd = int(upd.sum())
    out = {
        "shape": list(w0.shape),
        "numel": numel,
        "bf16_sparsity": n_unchanged / numel,
        "update_density": n_exact / numel,
        "n_unchanged": n_unchanged,
        "n_changed": n_exact,
        "n_updated": n_upd,
        "principal_angle_max_deg": None,
        "principal_angle_mean_deg": None,
        "principal_angle_k": None,
        "nss": None,
        "stable_rank": None,
        "hill_alpha": None,
        "principal_mask_overlap": None,
        "low_magnitude_overlap": None,
        "n_principal_overlap": 0,
        "n_low_magnitude_overlap": 0,
    }
    low = G.low_magnitude_mask(w0, alpha)
    inter_low, _ = G.mask_overlap(low, upd)
    del low
    out["n_low_magnitude_overlap"] = inter_low
    out["low_magnitude_overlap"] = inter_low / n_upd if n_upd else None
    if not (bool(torch.isfinite(w0).all()) and bool(torch.isfinite(w1).all())):
        out["note"] = "non-finite values: SVD-based metrics not computed"
        del upd
        return out

    svd0 = G.svd64(w0)
    pmask = G.principal_mask(w0, mask_rank, alpha, svd0=svd0)
    inter_p, _ = G.mask_overlap(pmask, upd)
    del pmask, upd
    out["n_principal_overlap"] = inter_p
    out["principal_mask_overlap"] = inter_p / n_upd if n_upd else None

    svd1 = G.svd64(w1)
    ang = G.principal_angles_deg(w0, w1, k=k, svd0=svd0, svd1=svd1)
    out["principal_angle_max_deg"] = ang["max"]
    out["principal_angle_mean_deg"] = ang["mean"]
    out["principal_angle_k"] = ang["k"]
    out["nss"] = G.nss_from_singular_values(svd0[1], svd1[1])
    del svd0, svd1, ang

    delta = w1.to(torch.float64) - w0.to(torch.float64)
    sd = torch.linalg.svdvals(delta)
    del delta
    out["stable_rank"] = G.stable_rank_from_singular_values(sd)
    out["hill_alpha"] = G.hill_alpha_from_singular_values(sd, k=hill_k, shape=tuple(w0.shape))
    return out


def _mean(xs: Iterable[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def _median(xs: Iterable[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return float(statistics.median(v)) if v else None


def diagnose(
    base: str | os.PathLike | CheckpointReader,
    ft: str | os.PathLike | CheckpointReader,
    k: int = 512,
    eta: float = 1e-3,
    mask_rank: int = 64,
    alpha: float = 0.3,
    include: str | None = None,
    progress: bool = True,
    hill_k: int = 16,
    update_mask: str = "eta",
) -> dict:
    """Compare two checkpoints tensor by tensor; returns the JSON-ready result dict.

    ``base``/``ft``: checkpoint directory (single or sharded), ``.safetensors`` file, or a
    :class:`CheckpointReader`.  ``include``: regex, only tensor names it matches (``re.search``)
    are considered.  See the module docstring for the aggregation rules.
    """
    pattern = _check_settings(k, eta, mask_rank, alpha, hill_k, update_mask, include)
    r0 = _reader(base)
    r1 = _reader(ft)
    todo, skipped = _pair_tensors(r0, r1, pattern)

    matrices: dict[str, dict] = {}
    tensors: dict[str, dict] = {}
    tot_unchanged = tot_params = 0
    tot_exact = tot_mparams = 0
    tot_upd = tot_inter_p = tot_inter_l = 0

    bar = tqdm(todo, desc="diagnose", unit="tensor", disable=None if progress else True)
    for name in bar:
        w0 = r0.get(name)
        w1 = r1.get(name)
        if w0.dim() == 2:
            m = compare_matrices(
                w0, w1, k=k, eta=eta, mask_rank=mask_rank, alpha=alpha, hill_k=hill_k, update_mask=update_mask
            )
            matrices[name] = m
            n = m["numel"]
            tot_unchanged += m["n_unchanged"]
            tot_params += n
            tot_exact += m["n_changed"]
            tot_mparams += n
            tot_upd += m["n_updated"]
            tot_inter_p += m["n_principal_overlap"]
            tot_inter_l += m["n_low_magnitude_overlap"]
        else:
            n = w0.numel()
            nu = int(G.bf16_unchanged_mask(w0, w1, eta).sum())
            tensors[name] = {"shape": list(w0.shape), "numel": n, "bf16_sparsity": nu / n}
            tot_unchanged += nu
            tot_params += n
        del w0, w1
    bar.close()

    totals = {"unchanged": tot_unchanged, "params": tot_params, "changed": tot_exact, "matrix_params": tot_mparams,
              "updated": tot_upd, "principal": tot_inter_p, "low_magnitude": tot_inter_l}  # fmt: skip
    settings = {"k": k, "eta": eta, "mask_rank": mask_rank, "alpha": alpha, "hill_k": hill_k, "include": include,
                "update_mask": update_mask}  # fmt: skip
    return _result(r0, r1, matrices, tensors, skipped, totals, settings)


def _check_settings(k, eta, mask_rank, alpha, hill_k, update_mask, include) -> re.Pattern | None:
    """Refuse settings :func:`diagnose` cannot use; returns the compiled ``include`` pattern (or None)."""
    if k < 1 or mask_rank < 0 or hill_k < 2:
        raise ValueError(
            f"need k >= 1, mask_rank >= 0, hill_k >= 2 (got k={k}, mask_rank={mask_rank}, hill_k={hill_k})"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if update_mask not in ("eta", "exact"):
        raise ValueError(f"update_mask must be 'eta' or 'exact', got {update_mask!r}")
    try:
        return re.compile(include) if include else None
    except re.error as exc:
        raise ValueError(f"invalid --include regex {include!r}: {exc}") from None


def _pair_tensors(r0: CheckpointReader, r1: CheckpointReader, pattern: re.Pattern | None) -> tuple[list, dict]:
    """The tensors both checkpoints hold comparably (names matching ``pattern``), and why each other one is skipped."""

    def wanted(name: str) -> bool:
        return pattern is None or pattern.search(name) is not None

    names0 = sorted((n for n in r0.keys() if wanted(n)), key=natural_key)
    names1 = sorted((n for n in r1.keys() if wanted(n)), key=natural_key)
    set0, set1 = set(names0), set(names1)
    skipped: dict[str, str] = {}
    todo: list[str] = []
    for n in names0:
        if n not in set1:
            skipped[n] = "missing in fine-tuned checkpoint"
        elif r0.shape(n) != r1.shape(n):
            skipped[n] = f"shape mismatch: base {list(r0.shape(n))} vs fine-tuned {list(r1.shape(n))}"
        elif not (r0.is_floating(n) and r1.is_floating(n)):
            skipped[n] = f"non-floating dtype (base {r0.dtype(n)}, fine-tuned {r1.dtype(n)})"
        elif r0.numel(n) == 0:
            skipped[n] = "empty tensor"
        else:
            todo.append(n)
    for n in names1:
        if n not in set0:
            skipped[n] = "missing in base checkpoint"
    return todo, skipped


def _result(r0, r1, matrices: dict, tensors: dict, skipped: dict, totals: dict, settings: dict) -> dict:
    """:func:`diagnose`'s JSON-ready result: the aggregate summary (see the module docstring), per tensor, settings."""
    tot_unchanged, tot_params, tot_exact = totals["unchanged"], totals["params"], totals["changed"]
    tot_mparams, tot_upd = totals["matrix_params"], totals["updated"]
    tot_inter_p, tot_inter_l = totals["principal"], totals["low_magnitude"]
    update_mask, alpha = settings["update_mask"], settings["alpha"]
    mats = list(matrices.values())
    summary = {
        "bf16_sparsity": tot_unchanged / tot_params if tot_params else None,
        "update_density": tot_exact / tot_mparams if tot_mparams else None,
        "principal_mask_overlap": tot_inter_p / tot_upd if tot_upd else None,
        "low_magnitude_overlap": tot_inter_l / tot_upd if tot_upd else None,
        "principal_angle_max_deg": _mean(m["principal_angle_max_deg"] for m in mats),
        "nss": _mean(m["nss"] for m in mats),
        "stable_rank": _median(m["stable_rank"] for m in mats),
        "n_matrices": len(mats),
        "n_params": tot_params,
        # extras
        "principal_angle_mean_deg": _mean(m["principal_angle_mean_deg"] for m in mats),
        "hill_alpha": _median(m["hill_alpha"] for m in mats),
        "principal_mask_overlap_mean": _mean(m["principal_mask_overlap"] for m in mats),
        "low_magnitude_overlap_mean": _mean(m["low_magnitude_overlap"] for m in mats),
        "n_tensors": len(mats) + len(tensors),
        "n_matrix_params": tot_mparams,
        "n_updated": tot_upd,
        "n_skipped": len(skipped),
    }
    return {
        "summary": summary,
        "matrices": matrices,
        "tensors": tensors,
        "skipped": skipped,
        "settings": {
            "base": str(r0.path),
            "ft": str(r1.path),
            **settings,
            "update_mask_definition": (
                "entries NOT unchanged under eta: |w1-w0| > eta*max(|w0|,|w1|) on bf16 values"
                if update_mask == "eta"
                else "entries whose bf16 values differ at all"
            ),
            "overlap_summary": "count-weighted: sum |M & M_upd| / sum |M_upd| over matrices",
            "random_overlap_baseline": alpha,
            "svd_dtype": "float64",
        },
    }


# ---------------------------------------------------------------------------- reporting
def _fmt(x, kind: str = "g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    if kind == "pct":
        return f"{100 * x:.2f}%"
    if kind == "deg":
        return f"{x:.4f}°"
    if kind == "e":
        return f"{x:.3e}"
    return f"{x:.4g}"


def format_markdown(result: dict, top: int = 10, sort_by: str = "nss") -> str:
    """Markdown: a summary table and the ``top`` matrices with the largest ``sort_by``."""
    s = result["summary"]
    rows = [
        ("bf16 update sparsity", _fmt(s["bf16_sparsity"], "pct")),
        ("update density (bf16, 2-D)", _fmt(s["update_density"], "pct")),
        ("principal-mask overlap", _fmt(s["principal_mask_overlap"], "pct")),
        ("low-magnitude overlap", _fmt(s["low_magnitude_overlap"], "pct")),
        ("principal angle, max (mean over matrices)", _fmt(s["principal_angle_max_deg"], "deg")),
        ("NSS (mean over matrices)", _fmt(s["nss"], "e")),
        ("stable rank of ΔW (median)", _fmt(s["stable_rank"])),
        ("Hill α̂ of ΔW (median)", _fmt(s.get("hill_alpha"))),
        ("matrices", _fmt(s["n_matrices"])),
        ("parameters compared", _fmt(s["n_params"])),
        ("skipped tensors", _fmt(len(result.get("skipped", {})))),
    ]
    alpha = result.get("settings", {}).get("alpha")
    lines = ["| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    if alpha is not None:
        lines.append(f"\nRandom-mask overlap baseline: {100 * alpha:.0f}%.")
    mats = result.get("matrices", {})
    if mats and top > 0:

        def key(item):
            v = item[1].get(sort_by)
            return -math.inf if v is None else v

        ranked = sorted(mats.items(), key=key, reverse=True)[:top]
        lines += [
            "",
            f"Top {len(ranked)} matrices by {sort_by}:",
            "",
            "| matrix | shape | sparsity | density | max angle | NSS | stable rank | princ. ovl. | low-mag ovl. |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in ranked:
            lines.append(
                f"| {name} | {'x'.join(map(str, m['shape']))} | {_fmt(m['bf16_sparsity'], 'pct')} | "
                f"{_fmt(m['update_density'], 'pct')} | {_fmt(m['principal_angle_max_deg'], 'deg')} | "
                f"{_fmt(m['nss'], 'e')} | {_fmt(m['stable_rank'])} | {_fmt(m['principal_mask_overlap'], 'pct')} | "
                f"{_fmt(m['low_magnitude_overlap'], 'pct')} |"
            )
    skipped = result.get("skipped", {})
    if skipped:
        lines += ["", f"Skipped {len(skipped)} tensor(s):"]
        for name, why in list(skipped.items())[:top]:
            lines.append(f"- `{name}`: {why}")
        if len(skipped) > top:
            lines.append(f"- … and {len(skipped) - top} more (see the JSON)")
    return "\n".join(lines)


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_of(name: str) -> int | None:
    """Transformer layer index in a parameter name (``model.layers.3.mlp...`` -> 3), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def plot_diagnostics(result: dict, png_path: str | os.PathLike) -> Path:
    """Per-layer bars (bf16 sparsity, NSS, max principal angle) to a PNG (matplotlib Agg).

    Matrices are grouped by layer index when names carry one (count-weighted sparsity, mean NSS
    and angle per layer); otherwise there is one bar per matrix.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = result.get("matrices", {})
    groups: dict[str, list[dict]] = {}
    by_layer = any(layer_of(n) is not None for n in mats)
    if by_layer:
        keyed = sorted(mats.items(), key=lambda kv: (layer_of(kv[0]) is None, layer_of(kv[0]) or 0))
        for n, m in keyed:
            li = layer_of(n)
            groups.setdefault(str(li) if li is not None else "other", []).append(m)
    else:
        for n, m in mats.items():
            groups[n] = [m]
    labels = list(groups)
    spars, nss, ang = [], [], []
    for g in groups.values():
        tot = sum(m["numel"] for m in g)
        spars.append(sum(m["bf16_sparsity"] * m["numel"] for m in g) / tot if tot else 0.0)
        nss.append(_mean(m["nss"] for m in g) or 0.0)
        ang.append(_mean(m["principal_angle_max_deg"] for m in g) or 0.0)

    width = max(6.0, min(24.0, 0.35 * len(labels) + 2))
    fig, axes = plt.subplots(3, 1, figsize=(width, 9), sharex=True)
    x = range(len(labels))
    axes[0].bar(x, [100 * v for v in spars], color="tab:blue")
    axes[0].set_ylabel("bf16 sparsity (%)")
    axes[0].set_ylim(0, 100)
    axes[1].bar(x, nss, color="tab:orange")
    axes[1].set_ylabel("NSS")
    if any(v > 0 for v in nss):
        axes[1].set_yscale("log")
    axes[2].bar(x, ang, color="tab:green")
    axes[2].set_ylabel("max principal angle (°)")
    axes[2].set_xticks(list(x))
    axes[2].set_xticklabels(labels, rotation=90 if not by_layer or len(labels) > 40 else 0, fontsize=7)
    axes[2].set_xlabel("layer" if by_layer else "matrix")
    s = result.get("summary", {})
    title = "Parameter-space diagnostics"
    if s.get("bf16_sparsity") is not None:
        title += f" — sparsity {100 * s['bf16_sparsity']:.1f}%"
    fig.suptitle(title)
    return save_figure(fig, png_path)
