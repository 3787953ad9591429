"""``lockedopd plan CONFIG``: per-device memory of each phase from the model's configuration alone (no weights).

The architecture comes from the model's ``config.json`` (a local checkpoint directory), from the ``tiny`` settings,
or from a named entry of :data:`ARCHITECTURES` (``student.architecture: qwen3-8b``; the sizes of the public
``config.json`` files, so a GPU run can be planned on a laptop). Pruning (``keep_layers`` / ``drop_every``) is
applied. Each phase's bytes are the sum of:

- ``weights``: every parameter in the student's dtype; locked: the frozen base (target matrices in
  ``lock.base_dtype``), plus ``bases`` (the float32 U/V) and ``adapter`` (the float32 coefficients);
- ``gradients`` and ``optimizer_state`` of what trains (AdamW: two moments in the weights' dtype; ``adamw8bit``: one
  byte per moment plus block scales; ``lock.optimizer=factored``: one float32 moment of the coefficients plus the
  row and column sums of the second moment; ``coefficients`` (LockedAdamW): two float32 moments); ``tracker``: the
  warmup's float64 sketches;
- ``activations``: what autograd saves per decoder layer of a Llama-type block for ``N`` tokens of the device's
  micro-batch (``prompt + completion`` at their maxima): warmup ``4NI + 4NH + 4N·q + N·heads`` values (MLP
  intermediates, linear inputs, attention q/k/v/out with k/v repeated to every head), locked ``3NI + 2NH + 4N·q +
  N·heads + N·r`` per adapted matrix (frozen linears keep no input); with ``gradient_checkpointing`` one ``N×H``
  input per layer plus one layer recomputed; plus the final norm's ``N×H`` input and SDPA's boolean attention
  mask (``B·L²`` bytes; transformers makes none when nothing is padded, so this is the padded case's bound);
- ``logits``: the vocabulary-sized tensors of the loss at its peak: unchunked what the objective saves for
  backward (:data:`LOSS_COPIES`: the log-softmax for the exact reverse KL and the sampled-token objectives, also
  the probabilities and log-ratio for forward KL and JSD), the teacher's full log-probs (exact objectives) and two
  backward temporaries, in ``B·C·V`` float32 copies; chunked (``objective.chunk_size``) the ``N×H`` hidden states
  and four (reverse KL) or six copies of one chunk;
- ``teacher``: an in-process teacher's weights and its forward's logits (``teacher.batch_size`` full sequences ×
  V); a vLLM teacher runs on its own devices (``teacher_separate_bytes``, not in the total).

With ``--world-size N`` the micro-batch is split across devices (``batch_size`` is the global number of prompts);
``--fsdp`` shards weights, gradients, optimizer state and bases ``N`` ways and adds two gathered layers; without it
every device holds everything, plus DDP's gradient buckets. ``saved_for_backward_bytes`` (activations + the saved
part of the loss) is the quantity tests compare with ``torch.autograd.graph.saved_tensors_hooks`` counts;
``step_peak_bytes`` (the activations saved at the loss plus the larger of the loss's vocabulary-sized tensors and
one recomputed layer) is the peak of the tensors one step creates, compared with the live-tensor peak
``benchmarks/memory_speed.py`` measures on SmolLM2. Neither is added to ``total_bytes``, which sums activations,
logits and gradients as if all were alive at once (an upper bound).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ARCHITECTURES", "Architecture", "architecture_of", "format_plan", "plan_memory"]

GIB = 1024**3
#: Phase keys that describe the step rather than add to its total.
NOT_SUMMED = ("saved_for_backward_bytes", "step_peak_bytes")


@dataclass(frozen=True)
class Architecture:
    """The sizes of a Llama-type decoder (Llama, Qwen2/3, SmolLM2, Mistral) that memory depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False

    def matrices(self) -> dict[str, tuple[int, int]]:
        """``(out, in)`` of each Linear of one decoder layer, by module suffix."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.kv_dim
        return {
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }  # fmt: skip

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection."""
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """All parameters: embeddings, output layer (unless tied), layers (linears, two norms), final norm."""
        layer = sum(o * i for o, i in self.matrices().values()) + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * layer + self.hidden_size


def _arch(vocab, hidden, inter, layers, heads, kv_heads, head_dim=None, tied=False) -> Architecture:
    return Architecture(vocab, hidden, inter, layers, heads, kv_heads, head_dim or hidden // heads, tied)


#: Named architectures (from each model's public config.json on the Hugging Face hub).
ARCHITECTURES: dict[str, Architecture] = {
    "smollm2-135m": _arch(49152, 576, 1536, 30, 9, 3, tied=True),  # HuggingFaceTB/SmolLM2-135M-Instruct
    "qwen3-8b": _arch(151936, 4096, 12288, 36, 32, 8, 128),  # Qwen/Qwen3-8B (8.2B parameters)
    "qwen3-32b": _arch(151936, 5120, 25600, 64, 64, 8, 128),  # Qwen/Qwen3-32B (32.8B)
    "llama-3.1-70b": _arch(128256, 8192, 28672, 80, 64, 8, 128),  # meta-llama/Llama-3.1-70B-Instruct (70.6B)
    "llama-3.1-405b": _arch(128256, 16384, 53248, 126, 128, 8, 128),  # meta-llama/Llama-3.1-405B-Instruct
}


def architecture_of(spec) -> Architecture:
    """The :class:`Architecture` of a :class:`lockedopd.opd.config.ModelConfig`, pruning applied; no weights read.

    ``spec.architecture`` (a key of :data:`ARCHITECTURES`) wins; else ``tiny`` uses its settings, ``smollm2`` the
    SmolLM2-135M entry and a directory its ``config.json``.
    """
    if getattr(spec, "architecture", None):
        if spec.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {spec.architecture!r} is not one of {sorted(ARCHITECTURES)}; add its sizes to "
                "lockedopd.plan.ARCHITECTURES or point the model's source at a directory with a config.json."
            )
        arch = ARCHITECTURES[spec.architecture]
    elif spec.source == "tiny":
        from lockedopd.models import build_tiny_tokenizer

        heads = spec.num_heads
        arch = _arch(
            len(build_tiny_tokenizer()), spec.hidden_size, spec.intermediate_size, spec.num_layers, heads, heads
        )
    elif spec.source == "smollm2":
        arch = ARCHITECTURES["smollm2-135m"]
    else:
        path = Path(spec.source) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: plan reads a model's sizes from its config.json; download only that file, "
                f"or set architecture to one of {sorted(ARCHITECTURES)}."
            )
        raw = json.loads(path.read_text())
        raw = raw.get("text_config", raw)
        heads = raw["num_attention_heads"]
        arch = _arch(
            raw["vocab_size"], raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"], heads,
            raw.get("num_key_value_heads", heads), raw.get("head_dim"), bool(raw.get("tie_word_embeddings", False)),
        )  # fmt: skip
    if spec.keep_layers is not None:
        arch = _replace_layers(arch, len(spec.keep_layers))
    elif spec.drop_every is not None:
        from lockedopd.models import layers_to_keep

        arch = _replace_layers(arch, len(layers_to_keep(arch.num_layers, spec.drop_every)))
    return arch


def _replace_layers(arch: Architecture, layers: int) -> Architecture:
    return Architecture(**{**asdict(arch), "num_layers": layers})


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
#: Bytes per weight of a frozen base matrix in each ``lock.base_dtype`` (scales included; ``keep`` = the model's).
BASE_BYTES = {"bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 1 / 64}  # int8 adds one float32 scale per row


#: ``(B·C·V`` float32 copies an objective saves for backward unchunked, copies alive at one chunk's peak chunked``)``:
#: the exact reverse KL saves only the log-softmax (its own backward recomputes its terms, in blocks); forward KL
#: and JSD also save their probabilities and log-ratios; the sampled-token objectives save the log-softmax.
LOSS_COPIES = {"reverse_kl": (1, 4), "forward_kl": (3, 6), "jsd": (3, 6)}


def _adamw8bit_bytes(numel: int) -> float:
    """bitsandbytes AdamW8bit state of one tensor: uint8 moments + block scales + code books (fp32 below 4096)."""
    if numel < 4096:
        return 8.0 * numel
    return 2.0 * numel + 2 * 4 * math.ceil(numel / 256) + 2 * 4 * 256


def _activation_values(
    arch: Architecture, tokens: int, rows: int, length: int, phase: str, rank: int, targets
) -> float:
    """Values (not bytes) autograd saves in the decoder for ``tokens`` = rows × length tokens (module docstring)."""
    n, h, i, q = tokens, arch.hidden_size, arch.intermediate_size, arch.num_heads * arch.head_dim
    attention = 4 * n * q + n * arch.num_heads + 2 * n  # q, k, v, out of SDPA; logsumexp; norm scales
    if phase == "warmup":
        per_layer = 4 * n * i + 4 * n * h + attention
    else:
        per_layer = 3 * n * i + 2 * n * h + attention + len(targets) * n * rank
    return arch.num_layers * per_layer + n * h  # + the final norm's input


def plan_memory(
    config, world_size: int = 1, fsdp: bool = False, architecture: Architecture | None = None
) -> dict[str, Any]:
    """Per-device bytes of the warmup and locked phases of ``config`` (an :class:`lockedopd.OPDConfig`).

    ``architecture`` replaces the student's sizes from ``config.student`` (e.g. a model built in code whose
    vocabulary is not the tiny tokenizer's). Returns ``{"world_size", "fsdp", "student": {...}, "phases":
    {"warmup": {component: bytes, ..., "total_bytes"}, "locked": {...}}}``; see the module docstring
    for what each component counts.
    """
    if world_size < 1:
        raise ValueError(f"plan: --world-size must be >= 1, got {world_size}.")
    arch = architecture if architecture is not None else architecture_of(config.student)
    width = DTYPE_BYTES[config.student.dtype]
    shard = world_size if fsdp else 1
    rows = math.ceil(config.batch_size / world_size)
    completion, length = (
        config.rollout.max_new_tokens,
        config.rollout.max_prompt_tokens + config.rollout.max_new_tokens,
    )
    tokens, positions = rows * length, rows * completion
    targets = [name for name in arch.matrices() if name in set(config.target_modules)]
    shapes = [arch.matrices()[name] for name in targets]
    target_numel = arch.num_layers * sum(o * i for o, i in shapes)
    params = arch.num_parameters()
    rank, lock = config.lock.rank, config.lock
    gathered = 2 * (params - arch.vocab_size * arch.hidden_size) / max(arch.num_layers, 1) * width if fsdp else 0

    exact = config.objective.name in ("reverse_kl", "forward_kl", "jsd")
    logits_saved, logits_peak = _loss_bytes(config.objective, arch, positions, width, exact)

    teacher, teacher_separate = _teacher_bytes(config, rows, length, positions, exact)

    mask = rows * length * length  # SDPA's boolean 4-D attention mask, one byte per entry (none without padding)

    def activations(phase: str) -> tuple[float, float]:
        return _activation_bytes(config.gradient_checkpointing, arch, tokens, rows, length, phase, rank, targets,
                                 width, mask)  # fmt: skip

    phases: dict[str, dict[str, float]] = {}
    saved, peak = activations("warmup")
    optimizer = _full_optimizer_bytes(config.optimizer, arch, shapes, width, rank)
    k = lock.sketch_size or 2 * rank + 1
    co = lock.co_sketch_size or 2 * k + 1
    tracker = arch.num_layers * sum(8 * (o * k + co * i + i * rank) for o, i in shapes) if lock.enabled else 0
    gradients = target_numel * width
    phases["warmup"] = {
        "weights": params * width / shard + gathered,
        "gradients": gradients / shard + (gradients if world_size > 1 and not fsdp else 0),
        "optimizer_state": optimizer / shard,
        "tracker": tracker / shard,
        "activations": peak,
        "logits": logits_peak,
        "teacher": teacher,
        "saved_for_backward_bytes": saved + logits_saved,
        "step_peak_bytes": saved + max(peak - saved, logits_peak),
    }
    if lock.enabled:
        saved, peak = activations("locked")
        replicas = world_size > 1 and not fsdp  # a data-parallel process also holds the summed gradients
        phases["locked"] = {
            **_locked_state_bytes(lock, arch, shapes, params, target_numel, width, shard, gathered, replicas),
            "activations": peak,
            "logits": logits_peak,
            "teacher": teacher,
            "saved_for_backward_bytes": saved + logits_saved,
            "step_peak_bytes": saved + max(peak - saved, logits_peak),
        }
    _total_and_round(phases)
    return {
        "world_size": world_size,
        "fsdp": fsdp,
        "micro_batch_per_device": rows,
        "tokens_per_sequence": length,
        "student": {"parameters": params, "trained_in_warmup": target_numel, **asdict(arch)},
        "teacher_separate_bytes": int(teacher_separate),
        "phases": phases,
    }


def _activation_bytes(checkpointing: bool, arch, tokens, rows, length, phase, rank, targets, width, mask):
    """Activations a step saves for backward, and their peak (with the recomputation of activation checkpointing)."""
    if checkpointing:
        one_layer = _replace_layers(arch, 1)
        saved = (arch.num_layers + 1) * tokens * arch.hidden_size * width + mask  # layer inputs + final norm
        recompute = (
            _activation_values(one_layer, tokens, 0, length, phase, rank, targets) - tokens * arch.hidden_size
        ) * width
        return saved, saved + recompute
    values = _activation_values(arch, tokens, rows, length, phase, rank, targets) * width + mask
    return values, values


def _total_and_round(phases: dict[str, dict[str, float]]) -> None:
    """Add each phase's ``total_bytes`` (the components that add up) and round every entry to whole bytes."""
    for phase in phases.values():
        phase["total_bytes"] = sum(v for key, v in phase.items() if key not in NOT_SUMMED)
        for key, value in phase.items():
            phase[key] = int(round(value))


def _loss_bytes(objective, arch: Architecture, positions: int, width: int, exact: bool) -> tuple[float, float]:
    """The loss's bytes saved for backward and at its peak: vocabulary-sized float32 tensors, or one chunk of them."""
    copies_saved, copies_chunk = LOSS_COPIES.get(objective.name, (1, 6))
    lm_input = positions * arch.hidden_size * width
    if objective.chunk_size > 0:
        chunk = min(objective.chunk_size, positions)
        return lm_input, lm_input + copies_chunk * chunk * arch.vocab_size * 4
    # unchunked: the output layer is frozen in both phases, so it keeps no input
    saved = copies_saved * positions * arch.vocab_size * 4
    return saved, saved + (1 if exact else 0) * positions * arch.vocab_size * 4 + 2 * positions * arch.vocab_size * 4


def _full_optimizer_bytes(name: str, arch: Architecture, shapes: list, width: int, rank: int) -> float:
    """State bytes of the full-parameter optimizer ``name`` over the target matrices of every layer."""
    if name == "adamw":  # two moments in the weights' dtype
        return 2 * arch.num_layers * sum(o * i for o, i in shapes) * width
    if name == "factored":  # float32 m, and the row and column sums of the second moment
        return arch.num_layers * sum((o * i + o + i) * 4 for o, i in shapes)
    if name == "adamw8bit":
        return arch.num_layers * sum(_adamw8bit_bytes(o * i) for o, i in shapes)
    if name == "galore":
        return arch.num_layers * sum((2 * rank * max(o, i) + rank * min(o, i)) * 4 for o, i in shapes)
    raise ValueError(f"plan: no memory model for optimizer={name!r}; add one to plan._full_optimizer_bytes.")


def _locked_state_bytes(lock, arch, shapes, params, target_numel, width, shard, gathered, replicas) -> dict:
    """Per-device bytes of the locked phase's weights, bases, adapter, gradients and optimizer state."""
    rank = lock.rank
    base = target_numel * (width if lock.base_dtype == "keep" else BASE_BYTES[lock.base_dtype])
    if lock.base_dtype == "int8":
        base += arch.num_layers * sum(4 * o for o, _ in shapes)
    coefficient_numel = arch.num_layers * sum((o * rank if lock.mode == "right" else rank * rank) for o, _ in shapes)
    basis_numel = arch.num_layers * sum(i * rank + (o * rank if lock.mode == "two_sided" else 0) for o, i in shapes)
    if lock.optimizer == "factored":  # m of the coefficients + the row (out) and column (in) sums of v_W
        locked_optimizer_numel = coefficient_numel + arch.num_layers * sum(o + i for o, i in shapes)
    else:  # LockedAdamW: two moments of the coefficients
        locked_optimizer_numel = 2 * coefficient_numel
    return {
        "weights": ((params - target_numel) * width + base) / shard + gathered,
        "bases": basis_numel * 4 / shard,
        "adapter": coefficient_numel * 4 / shard,
        "gradients": coefficient_numel * 4 / shard + (coefficient_numel * 4 if replicas else 0),
        "optimizer_state": locked_optimizer_numel * 4 / shard,
    }


def _teacher_bytes(config, rows: int, length: int, positions: int, exact: bool) -> tuple[float, float]:
    """``(on the student's device, on separate devices)`` bytes of the teacher."""
    spec = config.teacher.model
    arch = architecture_of(spec)
    weights = arch.num_parameters() * DTYPE_BYTES[spec.dtype]
    if config.teacher.backend not in ("hf", "auto"):
        return 0.0, weights  # vLLM (engine or server) holds the teacher on its own devices
    batch, dtype = min(config.teacher.batch_size, rows), DTYPE_BYTES[spec.dtype]
    if config.objective.chunk_size > 0:  # decoder only; logits one row's completion at a time; hands over hidden
        return weights + batch * length * arch.hidden_size * dtype + length * arch.vocab_size * 4 + positions * (
            arch.hidden_size * dtype
        ), 0.0
    # logits of whole sequences (no grad); full log-probs it hands over are counted with the loss's copies
    return weights + batch * length * arch.vocab_size * dtype, 0.0


def format_plan(plan: dict[str, Any]) -> str:
    """A plain-text table of :func:`plan_memory`'s result, in GiB (MiB for small models)."""
    phases = plan["phases"]
    unit, scale = ("GiB", GIB) if max(p["total_bytes"] for p in phases.values()) >= GIB else ("MiB", 1024**2)
    keys = [key for key in next(iter(phases.values())) if key != "total_bytes" and key not in NOT_SUMMED]
    keys += [key for phase in phases.values() for key in phase if key not in keys and key not in NOT_SUMMED]
    keys = list(dict.fromkeys(k for k in keys if k != "total_bytes")) + ["total_bytes"]
    lines = [
        f"per-device memory ({unit}), world size {plan['world_size']}{' (FSDP)' if plan['fsdp'] else ''}, "
        f"micro-batch {plan['micro_batch_per_device']} x {plan['tokens_per_sequence']} tokens; "
        f"student {plan['student']['parameters'] / 1e9:.2f}B parameters",
        f"{'component':<18}" + "".join(f"{name:>12}" for name in phases),
    ]
    for key in keys:
        lines.append(f"{key:<18}" + "".join(f"{phases[p].get(key, 0) / scale:>12.2f}" for p in phases))
    if plan["teacher_separate_bytes"]:
        lines.append(f"teacher on its own (vLLM) devices: {plan['teacher_separate_bytes'] / GIB:.1f} GiB of weights")
    return "\n".join(lines)
