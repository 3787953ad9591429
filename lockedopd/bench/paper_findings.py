"""The paper's findings, measured on one student: each claim of *On the Geometry of On-Policy Distillation* with the
paper's number, ours (mean and 95% interval over training seeds) and a verdict.

An experiment with ``report: paper`` names its cells by role (:mod:`lockedopd.bench.paper_arms`); its
cells carry ``geometry.json`` (``geometry: true``, :mod:`lockedopd.bench.geometry`) and task accuracy. Verdicts follow
fixed rules, stated with each finding (:data:`RULES`), so a finding reads the same on any run:

- an ordering across arms is ``reproduced`` when it holds on every seed the arms share, ``opposite`` when the reverse
  ordering does, else ``not reproduced``;
- a trajectory "keeps" another when its median stable rank stays within ±25% of the other's at every checkpoint
  (mean over seeds), and "departs" otherwise;
- a stable rank "expands" / "contracts" when its last checkpoint's is ≥ 1.2x / ≤ 1/1.2 of its first, on every seed;
- functional sufficiency: the locked run's share of its unconstrained run's post-lock accuracy gain (greedy), per
  seed; OPD's is ``reproduced`` at a mean ≥ 0.9; the contrast is ``reproduced`` when SFT's interval lies below OPD's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lockedopd.bench.accuracy_report import Cells
from lockedopd.bench.paper_arms import ARMS, CONTROLS, SFT_OFF_DISTRIBUTION, label, sufficiency
from lockedopd.bench.paper_trajectories import (
    final_by_seed,
    geometry_by_seed,
    largest_gap,
    last_mean,
    mean_series,
    series_by_seed,
)
from lockedopd.bench.stats import t_interval

__all__ = ["KEEP_TOLERANCE", "NOT_MEASURED", "RULES", "findings"]

NOT_MEASURED = "not measured"  # the verdict of a claim whose cells have not run: no result, not a negative one

KEEP_TOLERANCE = 0.25
EXPANDS = 1.2
RULES = {
    "order": "holds on every shared seed: reproduced; the reverse on every seed: opposite; else not reproduced",
    "keeps": f"median stable rank within ±{KEEP_TOLERANCE:.0%} of OPD's at every checkpoint (mean over seeds); "
    "a control family is reproduced once every variant ran and each behaves as the paper found",
    "expands": f"last / first checkpoint's median stable rank ≥ {EXPANDS} (contracts: ≤ 1/{EXPANDS}) on every seed",
    "sufficiency": "share of the unconstrained run's post-lock greedy accuracy gain; OPD reproduced at mean ≥ 0.9; "
    "the contrast reproduced when SFT's 95% interval lies below OPD's",
}


def _fmt(values: dict[int, float], scale: float = 1.0, unit: str = "") -> str:
    t = t_interval(list(values.values()))
    if t["mean"] is None:
        return "—"
    if t["low"] is None:
        return f"{scale * t['mean']:.3g}{unit} (n=1)"
    return f"{scale * t['mean']:.3g}{unit} [{scale * t['low']:.3g}, {scale * t['high']:.3g}]"


def _order(per_method: dict[str, dict[int, float]], increasing: bool) -> str:
    """The verdict of an ordering of ``per_method`` (in the dict's order): see :data:`RULES` ``order``."""
    seeds = set.intersection(*(set(v) for v in per_method.values())) if per_method else set()
    if not seeds or any(not v for v in per_method.values()):
        return NOT_MEASURED
    rows = [[per_method[m][s] for m in per_method] for s in sorted(seeds)]

    def holds(row: list[float], up: bool) -> bool:
        """Whether ``row`` is strictly increasing (``up``) or strictly decreasing."""
        return all((b > a) if up else (b < a) for a, b in zip(row, row[1:]))

    if all(holds(r, increasing) for r in rows):
        return "reproduced"
    if all(holds(r, not increasing) for r in rows):
        return "opposite"
    return "not reproduced"


def _arm_order(cells: Cells, key: str, increasing: bool, scale: float, unit: str) -> tuple[str, str]:
    per = {arm: final_by_seed(cells, arm, key) for arm in ARMS}
    measured = ", ".join(f"{arm.upper()} {_fmt(v, scale, unit)}" for arm, v in per.items())
    return measured, _order(per, increasing)


def _keeps(cells: Cells, method: str, baseline: str = "opd") -> bool | None:
    """Whether ``method``'s mean stable-rank trajectory stays within the tolerance of ``baseline``'s."""
    gap = largest_gap(mean_series(series_by_seed(cells, method)), mean_series(series_by_seed(cells, baseline)))
    return None if gap is None else gap <= KEEP_TOLERANCE


def _trend(cells: Cells, method: str) -> dict[int, float]:
    """Per seed: last / first checkpoint's median stable rank."""
    return {s: r[-1] / r[0] for s, r in series_by_seed(cells, method).items() if len(r) > 1 and r[0]}


def _contrast(sft: dict[str, Any], opd: dict[str, Any]) -> str:
    """The sufficiency contrast's verdict from two share intervals (see :data:`RULES` ``sufficiency``)."""
    if opd["low"] is None or sft["low"] is None:
        return NOT_MEASURED
    if sft["high"] < opd["low"]:
        return "reproduced"
    if sft["low"] > opd["high"]:
        return "opposite"
    return "not reproduced"


def _sufficiency_findings(cells: Cells) -> list[dict[str, Any]]:
    suff = sufficiency(cells)
    opd = suff["opd"]["share"]
    opd_verdict = NOT_MEASURED if opd["mean"] is None else ("reproduced" if opd["mean"] >= 0.9 else "not reproduced")
    opd_share = _fmt(suff["opd"]["per_seed"])
    out = [
        _finding(
            "sufficiency_opd",
            "Training only inside OPD's top-16 update subspace taken at ~20% of training keeps OPD's accuracy gain.",
            "preserved on AIME 2024 and MATH-500",
            f"share of OPD's post-lock gain {opd_share}",
            opd_verdict,
            "sufficiency",
        )
    ]
    for arm, fid, which in (("sft", "sufficiency_contrast", ""),
                            (SFT_OFF_DISTRIBUTION, "sufficiency_contrast_off_distribution",
                             " trained on solutions in another style (off the student's distribution)")):  # fmt: skip
        out.append(
            _finding(
                fid,
                f"The same constraint degrades SFT{which}: the early subspace is sufficient for OPD, not for SFT.",
                "SFT substantially degraded",
                f"{label(arm)} keeps {_fmt(suff[arm]['per_seed'])} of its gain, OPD {opd_share}",
                _contrast(suff[arm]["share"], opd),
                "sufficiency",
            )
        )
    return out


def _finding(fid: str, claim: str, paper: str, measured: str, verdict: str, rule: str) -> dict[str, Any]:
    return {"id": fid, "claim": claim, "paper": paper, "measured": measured, "verdict": verdict, "rule": RULES[rule]}


def _control_finding(cells: Cells, family: str, claim: str, paper: str, expect: Callable[[str], bool]) -> dict:
    """A control family: each variant keeps OPD's trajectory or departs; ``expect(variant)`` says which the paper
    found. The claim is about every variant of the family: it is ``reproduced`` only once all of them ran, while one
    that went against the paper already makes it ``not reproduced``."""
    variants = CONTROLS[family]
    outcomes = {v: _keeps(cells, v) for v in variants if geometry_by_seed(cells, v)}
    missing = [v for v in variants if v not in outcomes]
    agree = {v: k == expect(v) for v, k in outcomes.items() if k is not None}
    if not agree or len(agree) < len(outcomes):
        verdict = NOT_MEASURED
    elif not all(agree.values()):
        verdict = "opposite" if not missing and not any(agree.values()) else "not reproduced"
    else:
        verdict = NOT_MEASURED if missing else "reproduced"
    opd_rank, opd_norm = last_mean(cells, "opd", "stable_rank_median"), last_mean(cells, "opd", "update_fro_norm")
    seeds = {v: len(series_by_seed(cells, v)) for v in agree}
    measured = "; ".join(
        f"{v}: {'keeps' if outcomes[v] else 'departs'} (median stable rank at the end "
        f"{last_mean(cells, v, 'stable_rank_median'):.3g} vs OPD's {opd_rank:.3g}, ‖ΔW‖_F "
        f"{last_mean(cells, v, 'update_fro_norm'):.3g} vs {opd_norm:.3g}; {n} seed{'s' if n != 1 else ''})"
        for v, n in seeds.items()
    )
    if outcomes and missing:
        measured += f"; not run yet: {', '.join(missing)}"
    return _finding(family.replace(" ", "_").replace("-", "_"), claim, paper, measured or "—", verdict, "keeps")


def findings(cells: Cells) -> list[dict[str, Any]]:
    """Every finding (see the module docstring for the verdict rules), in the paper's order."""
    out = []
    for fid, key, increasing, claim, paper, scale, unit in (
        ("bf16_sparsity", "bf16_sparsity", True, "bf16 update sparsity orders SFT < OPD < RLVR.",
         "8.1% / 51.6% / 77.2%", 100.0, "%"),
        ("update_density", "update_density", False, "Update density orders SFT > OPD > RLVR.",
         "92.7% / 46.3% / 27.8%", 100.0, "%"),
        ("principal_angle_rotation", "principal_angle_max_deg", False,
         "Rotation of the top singular subspace orders SFT > OPD > RLVR.", "> 10° / ~1° / < 0.5°", 1.0, "°"),
        ("spectral_shift", "nss", False, "Normalized spectral shift orders SFT > OPD > RLVR.",
         "SFT largest, RLVR smallest", 1.0, ""),
        ("low_magnitude_overlap", "low_magnitude_overlap", True,
         "Updates land on low-magnitude weights in the order SFT < OPD < RLVR.", "31.9% / 53.6% / 73.5%", 100.0, "%"),
    ):  # fmt: skip
        measured, verdict = _arm_order(cells, key, increasing, scale, unit)
        out.append(_finding(fid, claim, paper, measured, verdict, "order"))
    principal = {arm: final_by_seed(cells, arm, "principal_mask_overlap") for arm in ARMS}
    near = [t_interval(list(v.values()))["mean"] for v in principal.values()]
    verdict = NOT_MEASURED if None in near else ("reproduced" if max(near) <= 0.35 else "not reproduced")
    out.append(_finding(
        "principal_mask_overlap", "No paradigm targets principal weights: principal-mask overlap is near or below "
        "the 30% random baseline for all three.", "29.7% / 27.3% / 26.7%",
        ", ".join(f"{a.upper()} {_fmt(v, 100.0, '%')}" for a, v in principal.items()), verdict, "order",
    ))  # fmt: skip
    out.extend(_trajectory_findings(cells))
    out.extend(_sufficiency_findings(cells))
    out.append(
        _control_finding(
            cells,
            "token sparsification",
            "Keeping only 50% or 25% of tokens (top-KL or random) keeps OPD's stable-rank trajectory.",
            "all four variants keep it",
            lambda v: True,
        )
    )
    out.append(
        _control_finding(
            cells,
            "off-policy rollouts",
            "Off-policy rollouts keep OPD's stable rank (with a modestly larger update).",
            "matched stable rank",
            lambda v: True,
        )
    )
    out.append(_control_finding(cells, "objective mixing", "Mixing RLVR's advantage into OPD's changes the trajectory "
                                "once OPD's weight is small: λ ≥ 0.5 keeps it, λ ≤ 0.25 departs.",
                                "OPD-dominant mixtures keep it, weak OPD departs",
                                lambda v: float(v.removeprefix("mix_")) >= 0.5))  # fmt: skip
    return out


def _trend_verdict(trend: dict[int, float], expands: bool) -> str:
    """``reproduced`` when every seed moves the expected way by :data:`EXPANDS`, ``opposite`` when every seed moves
    the other way."""
    if not trend:
        return NOT_MEASURED
    up = all(v >= EXPANDS for v in trend.values())
    down = all(v <= 1 / EXPANDS for v in trend.values())
    if up or down:
        return "reproduced" if up == expands else "opposite"
    return "not reproduced"


def _trajectory_findings(cells: Cells) -> list[dict[str, Any]]:
    band = {
        s: max(r[1:]) / min(r[1:]) for s, r in series_by_seed(cells, "opd").items() if len(r) > 2 and min(r[1:]) > 0
    }
    verdict = NOT_MEASURED if not band else ("reproduced" if max(band.values()) <= 1.5 else "not reproduced")
    out = [
        _finding(
            "opd_rank_band",
            "OPD's stable rank stays in a narrow band through training.",
            "~20-30 throughout (max/min ≈ 1.5)",
            f"max/min over checkpoints {_fmt(band)}",
            verdict,
            "expands",
        )
    ]
    for arm, fid, expands, paper in (("sft", "sft_rank_expands", True, "~10 to > 60"),
                                     (SFT_OFF_DISTRIBUTION, "sft_off_distribution_rank_expands", True, "~10 to > 60"),
                                     ("rlvr", "rlvr_rank_contracts", False, "~30 to ~15")):  # fmt: skip
        trend, word = _trend(cells, arm), "expands" if expands else "contracts"
        claim = f"{label(arm)}'s stable rank {word} over training."
        out.append(_finding(fid, claim, paper, f"last / first {_fmt(trend)}", _trend_verdict(trend, expands),
                            "expands"))  # fmt: skip
    norms = {
        a: {s: r[-1] for s, r in series_by_seed(cells, a, "update_fro_norm").items() if r} for a in ("rlvr", "opd")
    }
    out.append(_finding("opd_norm_above_rlvr", "OPD's cumulative update is larger than RLVR's (locking is not a "
                        "small-update artefact).", "OPD's ‖ΔW‖_F substantially larger",
                        f"‖ΔW_T‖_F OPD {_fmt(norms['opd'])}, RLVR {_fmt(norms['rlvr'])}", _order(norms, True),
                        "order"))  # fmt: skip
    first = {
        arm: {s: r[0] for s, r in series_by_seed(cells, arm, "subspace_similarity_mean").items() if r} for arm in ARMS
    }
    against_sft = _order({"sft": first["sft"], "opd": first["opd"]}, True)
    against_rlvr = _order({"rlvr": first["rlvr"], "opd": first["opd"]}, True)
    out.append(
        _finding(
            "early_subspace",
            "OPD's top-16 subspace is aligned with its final update from the first checkpoint, earlier than SFT's "
            "and RLVR's.",
            "OPD ~0.8 at the first checkpoint",
            "similarity at the first checkpoint: " + ", ".join(f"{a.upper()} {_fmt(v)}" for a, v in first.items()),
            _both(against_sft, against_rlvr),
            "order",
        )
    )
    return out


def _both(first: str, second: str) -> str:
    """The verdict of a claim made of two comparisons: ``not measured`` until both are measured."""
    if NOT_MEASURED in (first, second):
        return NOT_MEASURED
    return first if first == second else "not reproduced"
