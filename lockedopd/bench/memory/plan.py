"""``lockedopd plan``'s prediction of each method's step, beside what the benchmark measured."""

from __future__ import annotations

from typing import Any

from lockedopd.bench.memory.methods import method_spec

__all__ = ["PLAN_KEYS", "add_plan", "plan_config", "planned_bytes"]

#: Per-method quantities that ``lockedopd plan`` predicts: measured key → plan key.
PLAN_KEYS = {
    "saved_bytes": "saved_for_backward_bytes",
    "grad_bytes": "gradients",
    "moment_bytes": "optimizer_state",
    "peak_live_bytes": "step_peak",
}


def plan_config(config: dict, method: str) -> Any:
    """The :class:`lockedopd.OPDConfig` of ``method``'s step (what ``lockedopd plan`` reads), or ``None`` for a
    method plan does not model (LoRA, projected, GaLore, other full-parameter optimizers, inference)."""
    from lockedopd.opd import load_config as load_opd_config

    spec = method_spec(method)
    if (spec.kind, spec.entry) not in (("full", "adamw"), ("lock", "subspace")):
        return None
    b, m = config["batch"], config["model"]
    overrides = [
        f"batch_size={b['batch_size']}",
        f"rollout.max_prompt_tokens={b['prompt_tokens']}",
        f"rollout.max_new_tokens={b['completion_tokens']}",
        "objective.name=reverse_kl",
        f"objective.chunk_size={config['objective']['chunk_size'] if spec.chunked else 0}",
        f"gradient_checkpointing={str(spec.checkpointing).lower()}",
        "optimizer=adamw",
        "student.dtype=float32",
        f"target_modules=[{','.join(config['target_modules'])}]",
        "lock.enabled=true",
        f"lock.rank={config['rank']}",
        f"lock.mode={spec.mode}",
        f"lock.optimizer={spec.lock_optimizer}",
    ]
    if m["source"] == "smollm2":
        overrides += ["student.source=smollm2", f"student.drop_every={m['drop_every'] or 'null'}"]
    return load_opd_config(None, overrides)


def planned_bytes(config: dict, method: str) -> dict[str, int] | None:
    """What ``lockedopd plan`` predicts for ``method``'s step, by :data:`PLAN_KEYS` (``None`` if not modelled).

    ``step_peak`` is plan's ``step_peak_bytes`` less one ``(B, C, V)`` float32 copy when unchunked: plan counts the
    teacher's full log-probs at the loss's peak, and here they exist before the step (the measured counterpart,
    ``peak_live_bytes``, counts only tensors the step creates).
    """
    from lockedopd.plan import Architecture, plan_memory

    opd_config = plan_config(config, method)
    if opd_config is None:
        return None
    arch = None
    m = config["model"]
    if m["source"] == "tiny":
        h, heads = m["hidden_size"], m["num_heads"]
        arch = Architecture(m["vocab_size"], h, m["intermediate_size"], m["num_layers"], heads, heads, h // heads)
    plan = plan_memory(opd_config, architecture=arch)
    phase = plan["phases"]["warmup" if method_spec(method).kind == "full" else "locked"]
    out = {key: phase[key] for key in ("saved_for_backward_bytes", "gradients", "optimizer_state")}
    teacher_copy = 0
    if not method_spec(method).chunked:
        b = config["batch"]
        teacher_copy = b["batch_size"] * b["completion_tokens"] * plan["student"]["vocab_size"] * 4
    out["step_peak"] = phase["step_peak_bytes"] - teacher_copy
    return out


def add_plan(results: dict[str, dict], config: dict) -> None:
    """Add ``plan`` (planned bytes) and ``plan_ratio`` (measured / planned, by :data:`PLAN_KEYS`) to each method
    ``lockedopd plan`` models."""
    for method, record in results.items():
        planned = planned_bytes(config, method)
        if planned is None:
            continue
        record["plan"] = planned
        record["plan_ratio"] = {
            key: (record[key] / planned[plan_key] if planned[plan_key] else None)
            for key, plan_key in PLAN_KEYS.items()
        }
