"""``lockedopd diagnose`` and ``lockedopd trajectory``: the paper's parameter-space metrics of two checkpoints, and
of a run's checkpoints over training.

``add_diagnose_parser(subparsers)`` / ``add_trajectory_parser(subparsers)`` register them; their runners
(``run_diagnose`` / ``run_trajectory``) return an exit code: 0 on success, 2 on a user-facing error (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from lockedopd.cli.command import add_command, add_report_arguments
from lockedopd.cli.errors import run_guarded
from lockedopd.runtime.atomic_io import atomic_write_text

__all__ = ["add_diagnose_parser", "run_diagnose", "add_trajectory_parser", "run_trajectory"]


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o):
    """Replace NaN/inf by None so the JSON is strict."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _write_json(obj, path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(_clean(obj), indent=2, default=_json_default) + "\n")
    return p


# ---------------------------------------------------------------------------- diagnose
def add_diagnose_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lockedopd diagnose BASE FT [...]``."""
    p = add_command(
        subparsers,
        "diagnose",
        "parameter-space diagnostics between two checkpoints (sparsity, angles, NSS, mask overlaps)",
        "Compare a base and a fine-tuned checkpoint tensor by tensor (streaming): bf16 update sparsity, update "
        "density, principal-angle rotation, normalized spectral shift, principal-mask and low-magnitude overlaps, "
        "stable rank and Hill alpha of the update.",
        run_diagnose,
    )
    p.add_argument("base", help="base checkpoint: HF dir (model.safetensors or sharded index) or .safetensors file")
    p.add_argument("ft", help="fine-tuned checkpoint, same forms as BASE")
    add_report_arguments(p, "write the full result JSON here", "per-layer bar plot PNG",
                         "only tensors whose name matches (re.search)")  # fmt: skip
    p.add_argument("--k", type=int, default=512, help="top-k left singular vectors for principal angles (512)")
    p.add_argument("--eta", type=float, default=1e-3, help="relative bf16 change tolerance (1e-3)")
    p.add_argument("--mask-rank", type=int, default=64, help="rank r of the principal-mask reconstruction (64)")
    p.add_argument("--alpha", type=float, default=0.3, help="mask fraction for both overlaps (0.3)")
    p.add_argument("--hill-k", type=int, default=16, help="top singular values for the Hill estimate (16)")
    p.add_argument(
        "--update-mask",
        choices=("eta", "exact"),
        default="eta",
        help="M_upd: entries changed beyond eta (default) or bf16 values differing at all",
    )
    p.add_argument("--top", type=int, default=10, help="matrices listed in the markdown table (10)")
    return p


def run_diagnose(args: argparse.Namespace) -> int:
    """``lockedopd diagnose``: 0 on success, 2 on an error (one line on stderr), 130 when interrupted."""
    return run_guarded("diagnose", diagnose_command, args)


def diagnose_command(args: argparse.Namespace) -> int:
    """The body of ``lockedopd diagnose`` (errors raise; :func:`run_diagnose` reports them)."""
    from lockedopd.diagnostics.diagnose import diagnose, format_markdown, plot_diagnostics

    result = diagnose(
        args.base,
        args.ft,
        k=args.k,
        eta=args.eta,
        mask_rank=args.mask_rank,
        alpha=args.alpha,
        include=args.include,
        progress=not getattr(args, "no_progress", False),
        hill_k=getattr(args, "hill_k", 16),
        update_mask=getattr(args, "update_mask", "eta"),
    )
    if result["summary"]["n_matrices"] == 0 and result["summary"]["n_params"] == 0:
        raise ValueError(
            f"{args.base} and {args.ft} share no tensor of equal name and shape"
            + (f" matching --include {args.include!r}" if getattr(args, "include", None) else "")
            + "; compare two checkpoints of the same model (or widen --include)."
        )
    print(format_markdown(result, top=getattr(args, "top", 10)))
    if getattr(args, "json_out", None):
        out = _write_json(result, args.json_out)
        print(f"\nwrote {out}")
    if getattr(args, "plot", None):
        out = plot_diagnostics(result, args.plot)
        print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------- trajectory
def add_trajectory_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lockedopd trajectory RUN_DIR [...]``."""
    p = add_command(
        subparsers,
        "trajectory",
        "update-trajectory metrics over a run's checkpoints (stable rank, norm, Hill, subspace similarity)",
        "Read RUN_DIR/checkpoints/step-XXXXXX/model.safetensors (step-000000 is W_0) and report, per checkpoint, "
        "the stable rank, Frobenius norm and Hill alpha of W_t - W_0 and the top-K right-subspace similarity to the "
        "final update.",
        run_trajectory,
    )
    p.add_argument("run_dir", help="run directory holding checkpoints/step-XXXXXX/")
    p.add_argument("--reference", metavar="RUN_DIR", default=None, help="compare final-update subspaces with this run")
    add_report_arguments(p, "default RUN_DIR/trajectory_metrics.json", "default RUN_DIR/trajectory_metrics.png",
                         "only matrices whose name matches (re.search)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=16, help="K right singular vectors for sim(t) and Hill (16)")
    return p


def run_trajectory(args: argparse.Namespace) -> int:
    """``lockedopd trajectory``: 0 on success, 2 on an error (one line on stderr), 130 when interrupted."""
    return run_guarded("trajectory", trajectory_command, args)


def trajectory_command(args: argparse.Namespace) -> int:
    """The body of ``lockedopd trajectory`` (errors raise; :func:`run_trajectory` reports them)."""
    from lockedopd.diagnostics.trajectory import (
        discover_run_checkpoints,
        final_update_similarity,
        plot_trajectory,
        trajectory_metrics,
    )

    progress = not getattr(args, "no_progress", False)
    top_k = getattr(args, "top_k", 16)
    include = getattr(args, "include", None)
    run = discover_run_checkpoints(args.run_dir)
    if not run["checkpoints"]:
        raise ValueError(
            f"run {args.run_dir} has no model checkpoints after step-000000"
            + (f" ({len(run['notes'])} skipped: {run['notes'][0]})" if run["notes"] else "")
        )
    result = trajectory_metrics(run["base"], run["checkpoints"], top_k=top_k, include=include, progress=progress)
    result["notes"] = run["notes"]
    if getattr(args, "reference", None):
        ref = discover_run_checkpoints(args.reference)
        if not ref["checkpoints"]:
            raise ValueError(f"reference run {args.reference} has no model checkpoints after step-000000")
        result["reference"] = final_update_similarity(
            run["base"],
            run["checkpoints"][-1][1],
            ref["base"],
            ref["checkpoints"][-1][1],
            top_k=top_k,
            include=include,
            progress=progress,
        )
        result["reference"]["run_dir"] = str(args.reference)
    run_dir = Path(args.run_dir)
    json_out = _write_json(result, args.json_out or run_dir / "trajectory_metrics.json")
    png_out = plot_trajectory(result, args.plot or run_dir / "trajectory_metrics.png")
    print("| step | stable rank (median) | ‖ΔW‖_F | Hill α̂ (median) | sim to final |")
    print("|---|---|---|---|---|")

    def f(x):
        return "n/a" if x is None else f"{x:.4g}"

    for r in result["per_step"]:
        print(
            f"| {r['step']} | {f(r['stable_rank_median'])} | {f(r['update_fro_norm'])} | "
            f"{f(r['hill_alpha_median'])} | {f(r['subspace_similarity_mean'])} |"
        )
    if "reference" in result:
        print(f"\nfinal-update subspace similarity vs {args.reference}: {f(result['reference']['mean'])}")
    for note in run["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"\nwrote {json_out}\nwrote {png_out}")
    return 0
