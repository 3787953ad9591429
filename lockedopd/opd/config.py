"""Configuration dataclasses for an OPD run, and a strict YAML loader with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lockedopd.opd.values import AUTO_BACKEND, BASE_DTYPES, check_mmap_threshold, check_server_url
from lockedopd.registry import registered_choices, registry_for
from lockedopd.subspace.settings import LOCK_MODES, TrackerSettings

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = ("float32", "bfloat16")
ROLLOUT_POLICIES = ("student", "teacher", "initial_student")


def choice(default: Any, allowed: tuple | Callable[[], Sequence[Any]], help: str) -> Any:
    """A setting whose allowed values are declared with it: ``allowed`` is a tuple, or a function returning them
    (a registry's names, read when the config is checked). :meth:`OPDConfig.validate` refuses any other value,
    naming the key and the allowed values; ``help`` says what the setting does."""
    return field(default=default, metadata={"choices": allowed, "help": help})


def allowed_values(spec: dataclasses.Field) -> tuple | None:
    """The allowed values a :func:`choice` field declares (None for a free setting)."""
    allowed = spec.metadata.get("choices")
    return tuple(allowed()) if callable(allowed) else allowed


def check_choices(section: Any, prefix: str = "") -> None:
    """Refuse, in ``section`` (a config dataclass) and its sub-sections, the first value of a :func:`choice` field
    that is not among its allowed values."""
    for spec in dataclasses.fields(section):
        value = getattr(section, spec.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{spec.name}.")
            continue
        allowed = allowed_values(spec)
        if allowed is not None and value not in allowed:
            raise ValueError(f"config: {prefix}{spec.name}={value!r} is not one of {list(allowed)}.")


def _at_least_one(section: str, values: dict[str, int]) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"config: {section}{key} must be >= 1, got {value}.")


@dataclass
class ModelConfig:
    """Where a model comes from.

    Attributes:
        source: ``"tiny"`` (random Llama built in code), ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a
            local HF checkpoint directory, ``built:RECIPE.yaml``, or a Hugging Face hub id (``Qwen/Qwen3-0.6B``:
            its snapshot in the user's HF cache, downloaded once; offline the cached one).
        revision: the hub revision (branch, tag or commit) of a hub id (``null`` = the default branch).
        trust_remote_code: let transformers run the model repository's own code (off unless set).
        num_layers / hidden_size / intermediate_size / num_heads / seed: shape and init of a ``tiny`` model.
        init_std: weight init std of a ``tiny`` model (larger = peakier next-token distributions).
        drop_every: remove every n-th decoder layer (2 = every other, 3 = every third); a layer-pruned student.
        keep_layers: explicit decoder layer indices to keep (overrides ``drop_every``).
        dtype: ``float32`` or ``bfloat16``.
        architecture: a named architecture of :data:`lockedopd.plan.ARCHITECTURES` (e.g. ``qwen3-8b``) that
            ``lockedopd plan`` reads the sizes from when ``source``'s config.json is not on this machine (training
            itself always loads ``source``).
    """

    source: str = "tiny"
    revision: str | None = None
    trust_remote_code: bool = False
    num_layers: int = 2
    hidden_size: int = 32
    intermediate_size: int = 64
    num_heads: int = 4
    seed: int = 0
    init_std: float = 0.02
    drop_every: int | None = None
    keep_layers: list[int] | None = None
    dtype: str = choice("float32", DTYPES, "the weights' dtype")
    architecture: str | None = None


@dataclass
class TeacherConfig:
    """The teacher and how it is scored.

    Attributes:
        backend: ``"hf"`` (in-process transformers), ``"vllm"`` (in-process vLLM engine), ``"vllm_server"`` (a
            running vLLM OpenAI server: sampled-token and top-k log-probs only), another backend registered with
            :func:`lockedopd.teachers.register_teacher`, or ``"auto"``: the vLLM engine where vLLM imports and can
            load the teacher, else ``"hf"`` with a one-line notice saying why.
        vllm_scoring: how the ``vllm`` engine scores: ``"hidden_states"`` (vLLM runs the network and returns
            hidden states, the teacher's output layer runs here: exact full-vocabulary log-probs, every
            objective) or ``"prompt_logprobs"`` (vLLM's prompt log-probs: sampled token and top-k only).
        eval_backend: who scores held-out evaluation: ``null`` = the training teacher, ``"hf"`` = an in-process
            copy of the teacher, which gives the exact full-vocabulary KL when training scores with vLLM (costs a
            second copy of the teacher in memory).
        model: which model the teacher is.
        batch_size: sequences per teacher forward (HF backend).
        temperature: teacher logits are divided by it.
        server_url: base URL of a running vLLM OpenAI server (``vllm_server`` backend).
    """

    backend: str = choice("hf", registered_choices("teacher.backend"), "who scores the teacher (registered, or auto)")
    vllm_scoring: str = choice("hidden_states", ("hidden_states", "prompt_logprobs"), "what the vllm engine returns")
    eval_backend: str | None = choice(None, (None, "hf"), "who scores held-out evaluation (null = the teacher)")
    model: ModelConfig = field(default_factory=lambda: ModelConfig(num_layers=4, seed=1))
    batch_size: int = 8
    temperature: float = 1.0
    server_url: str = "http://127.0.0.1:8000"

    def returns_full_logprobs(self) -> bool:
        """Whether this teacher returns full-vocabulary log-probs, as its registered backend declares (``auto``
        does: it falls back to ``hf`` when the objective needs them)."""
        if self.backend == AUTO_BACKEND:
            return True
        return registry_for("teacher.backend").lookup(self.backend).returns_full_logprobs(self)

    def validate(self) -> None:
        """Raise ``ValueError`` for a setting of this section that cannot work."""
        if self.backend == "vllm_server":
            check_server_url(self.server_url)


@dataclass
class RolloutConfig:
    """Student sampling. ``max_prompt_tokens`` truncates prompts from the left.

    ``backend``: ``"hf"`` (transformers ``generate`` on the trained student) or ``"vllm"`` (an in-process vLLM
    engine kept in step after every optimizer step: full weights while training all parameters, the locked
    adapter as a LoRA after the lock; see :mod:`lockedopd.opd.vllm_rollout`).
    ``vllm_locked_sync``: after the lock, ``"lora"`` sends only the adapter (r·(in+out) numbers per matrix) and
    vLLM samples through its LoRA kernels; ``"full"`` merges and copies all weights every step and samples
    without LoRA (on CPU that is faster: vLLM's CPU LoRA kernels are slow; ``docs/vllm.md`` has the measurement).
    ``seeding`` (``hf`` backend): ``"batch"`` seeds torch's RNG once per micro-batch and samples the whole batch from
    it (the original behaviour; one process only); ``"prompt"`` gives the i-th prompt of a micro-batch its own
    stream, seeded ``seed + i`` (what the ``vllm`` backend always does), so a micro-batch split over several
    processes samples exactly what one process samples: needed for more than one process.
    ``policy``: who samples the rollouts the objective scores: ``"student"`` (on-policy OPD, the default),
    ``"teacher"`` (the in-process HF teacher samples; off-policy) or ``"initial_student"`` (a frozen copy of the
    student as the run started: a second student in memory; off-policy). Off-policy rollouts are sampled with the
    ``hf`` backend by one process.
    ``samples_per_prompt``: rollouts of each prompt per micro-batch (``batch_size`` prompts give
    ``batch_size x samples_per_prompt`` sequences); with more than one, a reward's baseline is the mean reward of
    its prompt's samples (GRPO's group baseline), else the micro-batch's mean reward.
    """

    backend: str = choice("hf", ("hf", "vllm"), "who samples the student")
    vllm_locked_sync: str = choice("lora", ("lora", "full"), "what reaches the vLLM sampler after the lock")
    seeding: str = choice("batch", ("batch", "prompt"), "one random stream per micro-batch or per prompt")
    policy: str = choice("student", ROLLOUT_POLICIES, "who samples the rollouts (off-policy: not the student)")
    samples_per_prompt: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 256

    def validate(self) -> None:
        """Raise ``ValueError`` for a setting of this section that cannot work."""
        _at_least_one(
            "rollout.", {"max_new_tokens": self.max_new_tokens, "samples_per_prompt": self.samples_per_prompt}
        )
        if self.temperature <= 0:
            raise ValueError(f"config: rollout.temperature must be > 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"config: rollout.top_p must be in (0, 1], got {self.top_p}.")


@dataclass
class ObjectiveConfig:
    """The OPD objective and the paper's controls.

    Attributes:
        name: ``"pg"`` (the paper's sampled-token reverse-KL advantage, policy gradient), ``"reverse_kl"``
            (exact full-vocabulary), ``"topk_reverse_kl"``, ``"forward_kl"``, ``"jsd"``, or another objective
            registered in :mod:`lockedopd.opd.objective_registry`.
        top_k: teacher top-k for ``topk_reverse_kl`` (and what scorers return).
        topk_tail: how ``topk_reverse_kl`` treats the tokens outside the teacher's top-k: ``"sampled"`` (exact on
            the top-k plus an unbiased estimate of the rest from the sampled token, whose teacher log-prob every
            scorer returns), ``"bucket"`` (all other tokens as one bucket: a lower bound on the exact KL) or
            ``"renormalize"`` (both models renormalised on the top-k; the student's outside mass is unconstrained).
        beta: JSD β (0 = forward KL, 1 = reverse KL).
        token_keep_fraction: keep only this fraction of completion tokens in the loss.
        token_keep_mode: ``"top"`` (highest per-token KL) or ``"random"``.
        reward_lambda: λ in A = λ·A_OPD + (1−λ)·A_reward; 1 = pure OPD.
        reward_fn: the verifiable reward: a built-in (``"contains_answer"``: the last number; ``"math"``: math-verify),
            a task's name (its verifier) or ``"module:function"``.
        chunk_size: compute the student's log-softmax, the teacher's full log-probs and the objective over chunks of
            this many completion tokens, each chunk checkpointed, so no ``[tokens × vocab]`` tensor of the batch
            exists at once (:mod:`lockedopd.opd.chunked_loss`; same value and gradient up to rounding); the
            in-process teacher then returns hidden states instead of full log-probs. 0 = off (one pass).
    """

    name: str = choice("pg", registered_choices("objective.name"), "the objective (a registered name)")
    top_k: int = 20
    topk_tail: str = choice("sampled", ("sampled", "bucket", "renormalize"), "topk_reverse_kl outside the top-k")
    beta: float = 0.5
    token_keep_fraction: float = 1.0
    token_keep_mode: str = choice("top", ("top", "random"), "which tokens token_keep_fraction keeps")
    reward_lambda: float = 1.0
    reward_fn: str | None = None
    chunk_size: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` for a setting of this section that cannot work."""
        if not 0.0 < self.token_keep_fraction <= 1.0:
            raise ValueError(
                f"config: objective.token_keep_fraction must be in (0, 1], got {self.token_keep_fraction}."
            )
        if self.chunk_size < 0:
            raise ValueError(f"config: objective.chunk_size must be >= 0 (0 = unchunked), got {self.chunk_size}.")
        if not 0.0 <= self.reward_lambda <= 1.0:
            raise ValueError(f"config: objective.reward_lambda must be in [0, 1], got {self.reward_lambda}.")
        if self.reward_lambda < 1.0 and not self.reward_fn:
            raise ValueError("config: objective.reward_lambda < 1 mixes in a reward; set objective.reward_fn too.")


@dataclass
class DataConfig:
    """Prompts: a JSONL file, a parquet file, a ``datasets`` ``save_to_disk`` directory or a hub dataset name
    (:func:`lockedopd.data.load_records`), each row a prompt (and optionally an answer for rewards and accuracy, and
    a completion for ``sft``).

    Attributes:
        train_path: training prompts; ``null`` with a tiny model uses built-in synthetic prompts.
        eval_path: held-out prompts; ``null`` holds out ``eval_size`` prompts of the train set instead.
        eval_size: how many held-out prompts to evaluate on.
        use_chat_template: wrap prompts with the tokenizer's chat template.
        split / eval_split: the split of a ``datasets`` source the train / held-out prompts come from.
        subset: the configuration of a hub dataset (``null`` = its default).
        prompt_field / answer_field / completion_field: the columns holding them (a chat ``messages`` column is
            read when there is no prompt column: its last user turn, and the assistant turn after it).
    """

    train_path: str | None = None
    eval_path: str | None = None
    eval_size: int = 16
    use_chat_template: bool = True
    split: str = "train"
    eval_split: str = "test"
    subset: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    completion_field: str = "completion"


@dataclass
class LockConfig(TrackerSettings):
    """Warmup → lock. ``enabled: false`` runs plain full-parameter OPD.

    The stability test's settings (``rank``, ``threshold``, ``patience``, ``check_every``, ``min_fraction``,
    ``min_warmup_steps``, ``max_warmup_steps``, ``sketch_size``, ``co_sketch_size``) are those of
    :class:`lockedopd.subspace.TrackerSettings`, which this class extends; the TRL callback takes the same ones.

    Attributes:
        enabled: lock after a warmup (false = full-parameter OPD throughout).
        mode: ``"right"`` (ΔW = A·Vᵀ, trains out×r) or ``"two_sided"`` (ΔW = U·C·Vᵀ, trains r×r).
        at_step: lock exactly after this many steps (never earlier; the stability test and ``max_warmup_steps``
            then do not decide; see :class:`lockedopd.subspace.LockPolicy`).
        basis_path: lock at step 0 from a saved ``basis.safetensors``.
        lr_scale: learning-rate multiplier of the coefficient optimizer: ``"auto"`` (per matrix, keeps the W-space
            step of projected full AdamW; see :func:`lockedopd.optim.lr_scale_from_adam_state`) or a number
            (1 = plain AdamW).
        adapter: what trains after the lock: ``"subspace"`` (the locked basis, lockedopd's method) or ``"lora"``
            (PEFT LoRA of rank ``rank`` on the same modules, fresh: a baseline; ``at_step: 0`` = LoRA from step 0).
        basis_source: ``"tracker"`` (the warmup's top-r subspace) or ``"random"`` (a random orthonormal basis of the
            same rank: the control that shows the subspace, not the rank, carries the gain).
        optimizer: ``"factored"`` (the default: :class:`lockedopd.optim.FactoredSubspaceAdamW`, the W-space AdamW
            step of the projected gradient, its second moment kept as row and column sums; coefficient-size state;
            ``lr_scale: auto`` = 1), ``"coefficients"`` (LockedAdamW: Adam on each coefficient of A or C) or
            ``"projected_full"`` (the full weights stay trainable; AdamW keeps full W-space moments of the projected
            gradient and every update is projected onto the subspace: memory-heavy, a benchmark reference). What
            each keeps of full OPD's gain is measured in ``benchmarks/README.md``.
        lora_alpha: LoRA's alpha (``null`` = rank, scaling 1) for ``adapter: lora``.
        base_dtype: the locked matrices' frozen weights after the lock (the warmup update folded in): ``"keep"``
            (the student's dtype), ``"bf16"``, ``"int8"`` or ``"nf4"`` (bitsandbytes, QLoRA-style; the coefficients
            stay float32). What the rounding loses is logged and written to ``lock.json`` (``base_quantization``).
            Needs ``monitor.enabled: false`` (the monitor takes gradients of the full-precision base weights).
    """

    enabled: bool = False
    mode: str = choice("right", LOCK_MODES, "right: ΔW = A·Vᵀ; two_sided: ΔW = U·C·Vᵀ")
    at_step: int | None = None
    basis_path: str | None = None
    lr_scale: float | str = "auto"
    adapter: str = choice("subspace", ("subspace", "lora"), "what trains after the lock")
    basis_source: str = choice("tracker", ("tracker", "random"), "the warmup's subspace, or a random control")
    optimizer: str = choice("factored", ("coefficients", "factored", "projected_full"), "the locked optimizer")
    lora_alpha: float | None = None
    base_dtype: str = choice("keep", BASE_DTYPES, "the frozen base's dtype after the lock")

    def validate(self) -> None:
        """Raise ``ValueError`` for a setting of this section that cannot work (alone or with another of it)."""
        _at_least_one("lock.", {"rank": self.rank, "check_every": self.check_every, "patience": self.patience})
        if self.max_warmup_steps is not None and self.max_warmup_steps < 1:
            raise ValueError(f"config: lock.max_warmup_steps must be >= 1 or null, got {self.max_warmup_steps}.")
        for key, value in (("lock.threshold", self.threshold), ("lock.min_fraction", self.min_fraction)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"config: {key} must be in (0, 1], got {value}.")
        if self.lr_scale != "auto" and (
            isinstance(self.lr_scale, bool) or not isinstance(self.lr_scale, (int, float)) or self.lr_scale <= 0
        ):
            raise ValueError(f"config: lock.lr_scale must be 'auto' or a number > 0, got {self.lr_scale!r}.")
        no_basis_needed = self.adapter == "lora" or self.basis_source == "random"
        if self.at_step is not None and (self.at_step < 0 or (self.at_step == 0 and not no_basis_needed)):
            raise ValueError(
                f"config: lock.at_step must be >= 1 or null, got {self.at_step} (0 = lock before the first step needs "
                "no warmup update: only with lock.adapter=lora or lock.basis_source=random; else use lock.basis_path)."
            )
        if self.adapter == "lora" and (self.optimizer == "projected_full" or self.basis_path or self.mode != "right"):
            raise ValueError(
                "config: lock.adapter=lora trains a fresh LoRA with AdamW (lock.optimizer does not apply); it takes "
                "no lock.basis_path, lock.optimizer=projected_full or lock.mode=two_sided. Drop those settings."
            )
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"config: lock.lora_alpha must be > 0 or null, got {self.lora_alpha}.")


@dataclass
class MonitorConfig:
    """The trajectory monitor of locked runs (see :class:`lockedopd.diagnostics.TrajectoryMonitor`).

    Attributes:
        enabled: measure the unconstrained gradient every ``every`` locked steps.
        every: check period in steps (each check costs one full-weight gradient for that step and one for the next,
            whose fresh batch scores the check out of sample).
        capture_threshold: captured gradient-energy share below which a check counts as drifting; ``"auto"`` =
            5 × the share a random subspace of the same size would capture (per-batch gradients are noisy, so a
            well-locked run captures far less than 1; ``docs/results.md`` has measured values).
        patience: drifting checks in a row that make a drift.
        on_drift: ``"warn"`` (log it), ``"relock"`` (fold the adapter in, track again, lock a new basis) or
            ``"unlock"`` (fold the adapter in and finish with full-parameter training).
    """

    enabled: bool = True
    every: int = 2
    capture_threshold: float | str = "auto"
    patience: int = 3
    on_drift: str = choice("warn", ("warn", "relock", "unlock"), "what a drift does")

    def validate(self) -> None:
        """Raise ``ValueError`` for a setting of this section that cannot work."""
        _at_least_one("monitor.", {"every": self.every, "patience": self.patience})
        threshold = self.capture_threshold
        if threshold != "auto" and (isinstance(threshold, (str, bool)) or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"config: monitor.capture_threshold must be 'auto' or in [0, 1], got {threshold!r}.")


@dataclass
class GaloreConfig:
    """GaLore (``optimizer: galore``, the ``galore-torch`` package): a whole-run low-rank-gradient baseline.

    Attributes:
        rank: rank of the gradient projection (``null`` = ``lock.rank``).
        update_proj_gap: steps between refreshes of the projection (an SVD of the gradient).
        scale: GaLore's update scale (its α).
        proj_type: ``"std"``, ``"left"``, ``"right"`` or ``"reverse_std"`` (which side GaLore projects).
    """

    rank: int | None = None
    update_proj_gap: int = 10
    scale: float = 1.0
    proj_type: str = choice("std", ("std", "reverse_std", "left", "right"), "which side GaLore projects")


@dataclass
class AccuracyConfig:
    """Task accuracy at every evaluation (:func:`lockedopd.opd.accuracy.evaluate_accuracy`).

    Attributes:
        verifier: who judges a completion: a task's name (its verifier, e.g. ``column_addition``), a built-in reward
            (``contains_answer``) or ``"module:function"``; ``null`` = no accuracy evaluation.
        path: problems with an answer each, any source ``data.train_path`` takes (a JSONL file, parquet, a
            ``save_to_disk`` directory, a hub dataset name; ``null`` = ``data.eval_path``).
        split / subset / prompt_field / answer_field: how to read ``path`` when it is a ``datasets`` source with its
            own names (``null`` = ``data.eval_split`` / ``data.subset`` / ``data.prompt_field`` /
            ``data.answer_field``).
        size: the first ``size`` problems of ``path`` are scored.
        samples: samples per problem for the mean accuracy at ``temperature`` (0 = greedy exact match only).
        temperature: sampling temperature of those samples.
        max_new_tokens: the longest completion (``null`` = ``rollout.max_new_tokens``).
        batch_size: rows per ``generate`` call.
        eval_steps: accuracy is measured at the start, at the lock and at the end of a run, and also every
            ``eval_steps`` steps when > 0 (it costs ``(1 + samples) x size`` generations, so it keeps its own period;
            the held-out KL keeps ``eval_steps``).
    """

    verifier: str | None = None
    path: str | None = None
    split: str | None = None
    subset: str | None = None
    prompt_field: str | None = None
    answer_field: str | None = None
    size: int = 500
    samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int | None = None
    batch_size: int = 64
    eval_steps: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` for a setting of this section that cannot work."""
        for key, value in (("size", self.size), ("batch_size", self.batch_size)):
            if value < 1:
                raise ValueError(f"config: accuracy.{key} must be >= 1, got {value}.")
        if self.samples < 0 or self.eval_steps < 0:
            got = f"{self.samples}, {self.eval_steps}"
            raise ValueError(f"config: accuracy.samples and accuracy.eval_steps must be >= 0, got {got}.")
        if self.temperature <= 0:
            raise ValueError(f"config: accuracy.temperature must be > 0, got {self.temperature}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"config: accuracy.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}.")


@dataclass
class OPDConfig:
    """Everything an OPD run needs. Load from YAML with :func:`load_config`.

    Attributes:
        output_dir: run directory (config, metrics.jsonl, checkpoints, plots).
        seed: every random draw of the run derives from it (resume-exact).
        max_steps: optimizer steps.
        batch_size: prompts per micro-batch over all processes (each of N processes samples its share of them, so a
            config means the same run at any number of processes); ``grad_accum_steps`` micro-batches make one step.
        lr / lr_scheduler / lr_warmup_steps / min_lr_ratio: learning-rate schedule (constant, linear, cosine).
        weight_decay / adam_beta1 / adam_beta2 / adam_eps: AdamW settings.
        max_grad_norm: gradient clipping (0 disables).
        optimizer: the full-parameter optimizer, an entry of :data:`lockedopd.optim.full.FULL_OPTIMIZERS`:
            ``"adamw"``, ``"adamw8bit"`` (bitsandbytes' 8-bit AdamW; its moments are dequantized for the lock's
            carry), ``"factored"`` (AdamW with an Adafactor-factored second moment in W space: the locked optimizer's
            family, the matched full-parameter reference; with ``lock.enabled: false``) or ``"galore"`` (a
            baseline; see ``galore``).
        gradient_checkpointing: recompute the student's decoder-layer activations in the backward instead of keeping
            them (both phases; ``runtime.activation_checkpointing``): less memory, one more forward per step.
        malloc_mmap_threshold: bytes; > 0 fixes glibc's mmap threshold at this size when the trainer starts
            (``runtime.host_allocator``): freed blocks at least this large go back to the OS, so a CPU step's
            peak RSS follows its live tensors instead of glibc's resident heap, at some speed. 0 (default) keeps
            glibc's dynamic threshold. Ignored with a warning where the C library is not glibc.
        target_modules: student Linear modules trained (all other weights frozen).
        save_steps / eval_steps: checkpoint and held-out eval period (0 disables; the last step always saves).
        eval_at_start: evaluate the untrained student before step 1 (a benchmark grid turns it off in every cell but
            one per seed: the step-0 student is the same for all methods of a seed).
        resume: continue from the newest complete checkpoint in ``output_dir``.
        progress: show a progress bar.
        reference_run: run directory of an unconstrained OPD run of the same setting; ``trajectory.json`` then
            compares this run's final KL and final update with it.
        eval_sampling_seeds: held-out reverse KL = mean over this many student sampling seeds (seed i a pure function
            of (seed, i); 1 = the single seed of earlier runs). Each extra seed costs one more held-out rollout per
            evaluation and lowers the sampling noise of every point.
        eval_fixed_text: also measure KL on fixed text, the teacher's greedy completions of the held-out prompts
            (``eval_fixed_text_kl``, plus forward KL and the student's NLL of that text); needs full-vocabulary
            teacher log-probs for evaluation.
        device: where the student trains: ``"cpu"`` (default), ``"cuda"`` (each process the GPU of its ``LOCAL_RANK``;
            an in-process HF teacher goes there too, and several processes talk over NCCL instead of gloo) or
            ``"auto"`` (CUDA where torch sees a GPU, else the CPU).
        fsdp: shard the student over the processes with FSDP2 (:mod:`lockedopd.runtime.fsdp`; needs ``torchrun`` /
            ``accelerate launch`` with >= 2 processes, and ``accelerate launch`` with an FSDP config turns it on):
            weights, gradients and AdamW state in the warmup, the frozen base, the coefficients and the locked
            optimizer's state after the lock (the bases stay whole). Rollouts gather the student whole for sampling;
            checkpoints are written whole, as without it. ``false`` (default): each process holds the whole student.
        eval_fixed_text_path: where those completions are cached (made once, reused while prompts, length and
            teacher match): a ``.json`` file, or a directory holding one file per prompt set (what a benchmark grid
            shares); ``null`` = ``output_dir/fixed_text.json``.
    """

    output_dir: str = "runs/opd"
    seed: int = 0
    max_steps: int = 10
    batch_size: int = 4
    grad_accum_steps: int = 1
    lr: float = 1e-3
    lr_scheduler: str = choice("cosine", ("constant", "linear", "cosine"), "the learning-rate schedule")
    lr_warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    optimizer: str = choice("adamw", registered_choices("optimizer"), "the full-parameter optimizer (registered)")
    gradient_checkpointing: bool = False
    malloc_mmap_threshold: int = 0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    save_steps: int = 5
    eval_steps: int = 5
    eval_at_start: bool = True
    resume: bool = False
    progress: bool = True
    reference_run: str | None = None
    eval_sampling_seeds: int = 1
    eval_fixed_text: bool = False
    eval_fixed_text_path: str | None = None
    device: str = choice("cpu", ("cpu", "cuda", "auto"), "where the student trains")
    fsdp: bool = False
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lock: LockConfig = field(default_factory=LockConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)

    def __post_init__(self) -> None:
        self.validate()

    def _validate_lock_method(self) -> None:
        """The lock's settings against the rest of the run (the lock's own are :meth:`LockConfig.validate`'s)."""
        lock = self.lock
        if (
            self.rollout.backend == "vllm"
            and self.rollout.vllm_locked_sync == "lora"
            and (lock.adapter == "lora" or lock.optimizer == "projected_full")
        ):
            raise ValueError(
                f"config: rollout.backend=vllm syncs the subspace adapter as a LoRA after the lock, which "
                f"lock.adapter={lock.adapter} / lock.optimizer={lock.optimizer} do not have; set "
                "rollout.vllm_locked_sync=full."
            )
        if lock.base_dtype != "keep" and (
            lock.adapter != "subspace" or lock.optimizer == "projected_full" or self.monitor.enabled
        ):
            raise ValueError(
                f"config: lock.base_dtype={lock.base_dtype} keeps the frozen base quantized, which only the subspace "
                "adapter trained by its coefficients supports, and the trajectory monitor needs the full-precision "
                "base's gradients: set lock.adapter=subspace, lock.optimizer=factored or coefficients and "
                "monitor.enabled=false (or lock.base_dtype=keep)."
            )
        why_not = registry_for("optimizer").lookup(self.optimizer).warms_up_a_lock
        if lock.enabled and why_not is not True:
            raise ValueError(
                f"config: optimizer={self.optimizer} cannot warm up a lock: {why_not}; set lock.enabled=false, or "
                "optimizer=adamw for a warmup."
            )

    def _validate_fsdp(self) -> None:
        if not self.fsdp:
            return
        lock = self.lock
        refused = {
            "rollout.backend=vllm": (self.rollout.backend == "vllm", "each vLLM engine needs the whole student; "
                                     "set rollout.backend=hf"),
            f"optimizer={self.optimizer}": (self._optimizer_shards() is not True, f"{self._optimizer_shards()}; "
                                            "set optimizer=adamw"),
            f"lock.base_dtype={lock.base_dtype}": (lock.enabled and lock.base_dtype != "keep", "int8/nf4 are "
                                                   "bitsandbytes modules FSDP2 cannot shard, bf16 is not checked "
                                                   "sharded; set lock.base_dtype=keep"),
            "lock.adapter=lora": (lock.enabled and lock.adapter == "lora", "set lock.adapter=subspace"),
            "lock.optimizer=projected_full": (lock.enabled and lock.optimizer == "projected_full",
                                              "set lock.optimizer=factored or coefficients"),
            f"lock.mode={lock.mode}": (lock.enabled and lock.mode != "right", "two-sided coefficients (r x r) do "
                                       "not split by rows; set lock.mode=right"),
            "monitor.enabled=true": (lock.enabled and self.monitor.enabled, "the monitor needs the frozen base's "
                                     "whole gradient; set monitor.enabled=false"),
            f"objective.chunk_size={self.objective.chunk_size}": (self.objective.chunk_size > 0, "the chunked "
                                                                  "loss calls the decoder outside the sharded root; "
                                                                  "set objective.chunk_size=0"),
            "gradient_checkpointing=true": (self.gradient_checkpointing, "not wired with FSDP2 here; set "
                                            "gradient_checkpointing=false"),
        }  # fmt: skip
        for setting, (bad, fix) in refused.items():
            if bad:
                raise ValueError(f"config: fsdp=true does not work with {setting}: {fix}, or set fsdp=false.")

    def _optimizer_shards(self) -> bool | str:
        return registry_for("optimizer").lookup(self.optimizer).shards_with_fsdp

    def _validate_accuracy(self) -> None:
        if self.accuracy.verifier is not None and self.accuracy.path is None and self.data.eval_path is None:
            raise ValueError(
                "config: accuracy.verifier is set but there are no problems to score: set accuracy.path (or "
                "data.eval_path) to a JSONL file whose records carry an answer."
            )

    def _validate_without_teacher(self) -> None:
        """An objective without a teacher trains on the data's completions (``sft``: it samples nothing) or on its
        samples' rewards (``rlvr``)."""
        objective = registry_for("objective.name").lookup(self.objective.name)
        if objective.needs_teacher:
            return
        name, rollout = self.objective.name, self.rollout
        refused = {
            "eval_fixed_text=true": (self.eval_fixed_text, "set eval_fixed_text=false (there is no teacher)"),
            "objective.reward_lambda < 1": (self.objective.reward_lambda < 1.0, "set objective.reward_lambda=1"),
            "objective.token_keep_fraction < 1": (self.objective.token_keep_fraction < 1.0,
                                                  "set objective.token_keep_fraction=1"),
            "rollout.policy=teacher": (rollout.policy == "teacher", "set rollout.policy=student"),
        }  # fmt: skip
        what = "trains on its samples' verifiable rewards, without a teacher"
        if not objective.samples_student:
            what = "trains on the data's completions, without a teacher"
            refused.update({
                "rollout.backend=vllm": (rollout.backend == "vllm", "set rollout.backend=hf (nothing is sampled)"),
                "objective.chunk_size > 0": (self.objective.chunk_size > 0, "set objective.chunk_size=0"),
                f"rollout.policy={rollout.policy}": (rollout.policy != "student", "set rollout.policy=student"),
                "rollout.samples_per_prompt > 1": (rollout.samples_per_prompt > 1,
                                                   "set rollout.samples_per_prompt=1"),
            })  # fmt: skip
        elif self.objective.reward_fn is None:
            refused["no objective.reward_fn"] = (True, "set objective.reward_fn to the task's verifier")
        for setting, (bad, fix) in refused.items():
            if bad:
                raise ValueError(f"config: objective.name={name} {what}; it does not work with {setting}: {fix}.")

    def _validate_rollout_policy(self) -> None:
        """Off-policy rollouts are sampled by an in-process HF model, in one process."""
        policy = self.rollout.policy
        if policy == "student":
            return
        refused = {
            "rollout.backend=vllm": (self.rollout.backend == "vllm", "set rollout.backend=hf"),
            "fsdp=true": (self.fsdp, "set fsdp=false"),
            f"teacher.backend={self.teacher.backend}": (policy == "teacher" and self.teacher.backend != "hf",
                                                        "the teacher samples in process: set teacher.backend=hf"),
        }  # fmt: skip
        for setting, (bad, fix) in refused.items():
            if bad:
                raise ValueError(f"config: rollout.policy={policy} does not work with {setting}: {fix}.")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work: finite numbers, the allowed values each
        :func:`choice` field declares, each section's own checks (its ``validate``), then the checks across
        sections."""
        for key, value in flatten_settings(dataclasses.asdict(self)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config: {key} must be a finite number, got {value}.")
        check_choices(self)
        try:
            check_mmap_threshold(self.malloc_mmap_threshold)
        except ValueError as exc:
            raise ValueError(f"config: {exc}") from None
        _at_least_one(
            "",
            {
                "max_steps": self.max_steps,
                "batch_size": self.batch_size,
                "grad_accum_steps": self.grad_accum_steps,
                "eval_sampling_seeds": self.eval_sampling_seeds,
            },
        )
        if self.lr <= 0:
            raise ValueError(f"config: lr must be > 0, got {self.lr}.")
        for section in (self.teacher, self.rollout, self.objective, self.lock, self.monitor, self.accuracy):
            section.validate()
        self._validate_lock_method()
        self._validate_fsdp()
        self._validate_accuracy()
        self._validate_without_teacher()
        self._validate_rollout_policy()
        self._validate_teacher_objective()

    def _validate_teacher_objective(self) -> None:
        """What the objective and the evaluation need from the teacher against what its backend returns."""
        if self.teacher.temperature != 1.0 and not self.teacher.returns_full_logprobs():
            raise ValueError(
                f"config: teacher.temperature={self.teacher.temperature} needs the teacher's logits, which vLLM "
                "prompt log-probs do not expose; use teacher.backend=hf, or vllm with vllm_scoring=hidden_states."
            )
        objective = registry_for("objective.name").lookup(self.objective.name)
        if objective.needs_full_logprobs and not self.teacher.returns_full_logprobs():
            raise ValueError(
                f"config: objective.name={self.objective.name!r} needs the teacher's full-vocabulary log-probs, which "
                f"teacher.backend={self.teacher.backend} with vllm_scoring={self.teacher.vllm_scoring} does not "
                "return; use objective.name=topk_reverse_kl or pg, teacher.backend=hf, or teacher.backend=vllm with "
                "vllm_scoring=hidden_states."
            )
        if self.eval_fixed_text and not (self.teacher.eval_backend == "hf" or self.teacher.returns_full_logprobs()):
            raise ValueError(
                f"config: eval_fixed_text=true needs full-vocabulary teacher log-probs for evaluation, which "
                f"teacher.backend={self.teacher.backend} with vllm_scoring={self.teacher.vllm_scoring} does not "
                "return; set teacher.eval_backend=hf, or eval_fixed_text=false."
            )


def _resolve_type(tp: Any) -> Any:
    """Strip ``Optional`` from a (string-evaluated) annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config: section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"config: unknown key '{prefix}{unknown[0]}'; allowed keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(names)}."
        )
    kwargs = {}
    for key, value in data.items():
        tp = _resolve_type(hints[key])
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ValueError(f"config: {prefix or 'top level'}: {exc}") from exc


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if value is None:
        return None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float:  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value) if isinstance(value, str) else _not_a_number(key, value)
        except ValueError:
            _not_a_number(key, value)
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"config: {key} must be {tp.__name__}, got {value!r}.")
    return value


def _not_a_number(key: str, value: Any):
    raise ValueError(f"config: {key} must be a number, got {value!r}.")


def config_from_dict(data: dict[str, Any]) -> OPDConfig:
    """Build an :class:`OPDConfig` from a nested mapping; unknown keys raise ``ValueError``."""
    return _from_dict(OPDConfig, data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. max_steps=2).")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section.")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> OPDConfig:
    """Read a YAML config file (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist; see recipes/configs/ for examples.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    apply_overrides(data, overrides or [])
    return config_from_dict(data)


def config_to_yaml(config: OPDConfig) -> str:
    """The config as the YAML a run directory keeps (``config.yaml``): every setting, in declaration order."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_to_dict(config: OPDConfig) -> dict[str, Any]:
    """Plain nested dict of a config (what ``output_dir/config.yaml`` holds)."""
    return dataclasses.asdict(config)


RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "save_steps",
        "eval_steps",
        "eval_at_start",
        "accuracy.eval_steps",
        "progress",
        "resume",
        "reference_run",
        "output_dir",
        "teacher.server_url",
        "fsdp",
        "malloc_mmap_threshold",
    }
)
"""Settings a resumed run may change: they extend, observe or move the run, say where the same teacher is served
(a restarted vLLM server may listen elsewhere) or how the host allocates memory; the training path stays the same."""


def flatten_settings(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings mapping as ``{dotted key: value}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], current: OPDConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every setting that differs from a run's ``config.yaml``.

    A setting the saved file does not have (written by an older version) counts as changed only when its current
    value is not the default.
    """
    old, new = flatten_settings(saved), flatten_settings(config_to_dict(current))
    defaults = flatten_settings(config_to_dict(OPDConfig()))
    changes = {}
    for key, value in new.items():
        before = old.get(key, defaults.get(key))
        if before != value and not (isinstance(before, (int, float)) and isinstance(value, (int, float))
                                    and float(before) == float(value)):  # fmt: skip
            changes[key] = (before, value)
    return changes
