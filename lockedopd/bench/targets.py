"""A task grid's targets: the claims an experiment is run to test, checked against its accuracy report.

An experiment lists them (``targets:`` in its YAML), one per line::

    targets:
      - {method: locked_right, share_at_least: 0.98}   # keeps >= 0.98 of the reference's accuracy gain
      - {method: random_basis, share_at_most: 0.5}
      - {method: locked_right, beats: lora}            # more accurate by more than the seed spread, less state
      - {method: locked_right, no_worse_than: lora_r64}

Every report checks each of them (:func:`check_targets`) by :data:`RULES` and says ``met``, ``not met`` or
``pending`` (a method has fewer than ``min_seeds`` finished seeds), with the numbers the verdict rests on, so a
target that is missed is reported with what was attained rather than dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lockedopd.bench.stats import spread
from lockedopd.bench.tables import markdown_table

KINDS = ("share_at_least", "share_at_most", "beats", "no_worse_than")
MIN_SEEDS = 3
RULES = {
    "share_at_least": "mean share of the reference's greedy accuracy gain over the method's seeds ≥ the target",
    "share_at_most": "mean share of the reference's greedy accuracy gain ≤ the target",
    "beats": (
        "mean final greedy accuracy above the other method's by more than the seed spread (the larger of the two "
        "methods' standard deviations over seeds), with less optimizer state"
    ),
    "no_worse_than": "mean final greedy accuracy at most one seed spread below the other method's",
}


@dataclass(frozen=True)
class Target:
    """One target: ``method`` against a share (``share_at_least`` / ``share_at_most``: a number) or against another
    method (``beats`` / ``no_worse_than``: a method name)."""

    method: str
    kind: str
    value: float | str

    def describe(self) -> str:
        """The target in words, e.g. ``locked_right keeps ≥ 0.98 of the reference's gain``."""
        return {
            "share_at_least": f"{self.method} keeps ≥ {self.value} of the reference's gain",
            "share_at_most": f"{self.method} keeps ≤ {self.value} of the reference's gain",
            "beats": f"{self.method} beats {self.value} by more than the seed spread, at less optimizer state",
            "no_worse_than": f"{self.method} is no worse than {self.value}",
        }[self.kind]


def parse_targets(raw: Any, methods: list[str]) -> list[Target]:
    """The experiment's ``targets`` list as :class:`Target` objects; ``ValueError`` naming the fix on bad input."""
    if not isinstance(raw, list):
        raise ValueError(f"experiment: targets must be a list of {{method: NAME, KIND: VALUE}}, got {raw!r}.")
    targets = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) - {"method", *KINDS} or "method" not in entry:
            raise ValueError(
                f"experiment: targets[{i}] = {entry!r}; write {{method: NAME, KIND: VALUE}} with KIND one of "
                f"{list(KINDS)}."
            )
        kinds = [k for k in KINDS if k in entry]
        if len(kinds) != 1:
            raise ValueError(f"experiment: targets[{i}] needs exactly one of {list(KINDS)}, got {kinds}.")
        kind, value = kinds[0], entry[kinds[0]]
        named = [entry["method"]] + ([value] if kind in ("beats", "no_worse_than") else [])
        unknown = [m for m in named if m not in methods]
        if unknown:
            raise ValueError(f"experiment: targets[{i}] names {unknown[0]!r}, not a method of {methods}.")
        if kind.startswith("share") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"experiment: targets[{i}].{kind} must be a number (a share, e.g. 0.95), got {value!r}.")
        targets.append(Target(entry["method"], kind, float(value) if kind.startswith("share") else value))
    return targets


def _finals(accuracy: dict[str, Any], method: str) -> list[float]:
    """A method's final greedy accuracies, one per finished seed."""
    per_seed = accuracy["methods"].get(method, {}).get("accuracy", {}).get("per_seed", {})
    return [v for v in per_seed.values() if v is not None]


def check_target(target: Target, accuracy: dict[str, Any], methods: dict[str, Any],
                 min_seeds: int = MIN_SEEDS) -> dict[str, Any]:  # fmt: skip
    """One target's verdict from ``results.json``'s ``accuracy`` section and its per-method facts (``methods``:
    ``optimizer_state_bytes``): ``{"target", "rule", "verdict": "met" | "not met" | "pending", "measured", ...}``."""
    out: dict[str, Any] = {"target": target.describe(), "method": target.method, "kind": target.kind,
                           "value": target.value, "rule": RULES[target.kind]}  # fmt: skip
    involved = [target.method] + ([] if target.kind.startswith("share") else [str(target.value)])
    seeds = {m: len(_finals(accuracy, m)) for m in involved}
    out["seeds"] = seeds
    short = [m for m in involved if seeds[m] < min_seeds]
    if target.kind.startswith("share"):
        share = accuracy["methods"].get(target.method, {}).get("share_of_full_accuracy_gain", {})
        mean = share.get("mean")
        out["measured"] = {"share": mean, "low": share.get("low"), "high": share.get("high")}
        met = None if mean is None else (mean >= target.value if target.kind == "share_at_least" else
                                         mean <= target.value)  # fmt: skip
        low, high = share.get("low"), share.get("high")
        bounds = "" if low is None else f" [{low:.3f}, {high:.3f}]"
        out["measured_text"] = "—" if mean is None else f"share {mean:.3f}{bounds}"
    else:
        other = str(target.value)
        a, b = _finals(accuracy, target.method), _finals(accuracy, other)
        met = None
        if a and b:
            sa, sb = spread(a), spread(b)
            seed_spread = max(s for s in (sa["std"], sb["std"], 0.0) if s is not None)
            diff = sa["mean"] - sb["mean"]
            state = (methods.get(target.method, {}).get("optimizer_state_bytes"),
                     methods.get(other, {}).get("optimizer_state_bytes"))  # fmt: skip
            out["measured"] = {"accuracy": sa["mean"], "other_accuracy": sb["mean"], "difference": diff,
                               "seed_spread": seed_spread, "optimizer_state_bytes": state[0],
                               "other_optimizer_state_bytes": state[1]}  # fmt: skip
            if target.kind == "beats":
                less_state = None not in state and state[0] < state[1]
                met = diff > seed_spread and less_state
            else:
                met = diff >= -seed_spread
            out["measured_text"] = (f"{100 * sa['mean']:.1f}% vs {100 * sb['mean']:.1f}%: difference "
                                    f"{100 * diff:+.1f} points, seed spread {100 * seed_spread:.1f}")  # fmt: skip
        else:
            out["measured"], out["measured_text"] = None, "—"
    if met is None or short:
        out["verdict"] = "pending"
        if short:
            out["measured_text"] += f" ({', '.join(f'{m}: {seeds[m]} of {min_seeds} seeds' for m in short)})"
    else:
        out["verdict"] = "met" if met else "not met"
    return out


def check_targets(targets: list[Target], accuracy: dict[str, Any], methods: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target's verdict (:func:`check_target`), in the experiment's order."""
    return [check_target(t, accuracy, methods) for t in targets]


def targets_markdown(checked: list[dict[str, Any]]) -> list[str]:
    """The ``results.md`` section: one row per target with what was measured and the verdict, then the rules."""
    if not checked:
        return []
    rows = [[c["target"], c["measured_text"], c["verdict"]] for c in checked]
    lines = ["## Targets", "", *markdown_table(["target", "measured", "verdict"], rows)]
    lines += ["", f"Rules (a verdict needs {MIN_SEEDS} finished seeds of every method it names):", ""]
    kinds = list(dict.fromkeys(c["kind"] for c in checked))
    return lines + [f"- {kind}: {RULES[kind]}" for kind in kinds] + [""]
