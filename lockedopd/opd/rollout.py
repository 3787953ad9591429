"""Student rollouts: the :class:`StudentSampler` protocol, sampling with HF ``generate``, and the batch layout.

Layout of a :class:`Rollout` batch (the same tensor ``generate`` returns):
``[left-padded prompt (P) | completion, right-padded after EOS (C)]``. Training re-runs the student on
exactly this tensor and keeps only the last ``C + 1`` logits, so no prompt logits are materialised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from lockedopd.data import count_missing_completions


@dataclass
class Rollout:
    """A batch of student samples.

    Attributes:
        input_ids: ``(B, P + C)`` left-padded prompts followed by completions.
        attention_mask: ``(B, P + C)`` 1 on real tokens (prompt and completion, EOS included).
        prompt_width: ``P``, the padded prompt length.
        completion_ids: ``(B, C)`` sampled tokens (pad after the first EOS).
        completion_mask: ``(B, C)`` bool, True on sampled tokens up to and including the first EOS.
        prompt_lengths: B unpadded prompt lengths.
        logprobs: ``(B, C)`` log-probs of the sampled tokens under the sampling policy (raw, temperature 1),
            no grad; 0 on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: list[int]
    logprobs: torch.Tensor

    def sequences(self) -> list[list[int]]:
        """Unpadded prompt + completion token ids per row (what teacher scorers take)."""
        rows = []
        for i in range(self.input_ids.shape[0]):
            prompt = self.input_ids[i, self.prompt_width - self.prompt_lengths[i] : self.prompt_width]
            completion = self.completion_ids[i][self.completion_mask[i]]
            rows.append(prompt.tolist() + completion.tolist())
        return rows

    @property
    def num_tokens(self) -> int:
        """Number of sampled completion tokens in the batch."""
        return int(self.completion_mask.sum())


def encode_prompts(
    tokenizer, prompts: Sequence[str], use_chat_template: bool = True, max_prompt_tokens: int = 256
) -> list[list[int]]:
    """Tokenize prompts (through the chat template when the tokenizer has one), truncating from the left."""
    encoded = []
    for text in prompts:
        if use_chat_template and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        ids = list(ids)[-max_prompt_tokens:]
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to zero tokens; remove empty prompts from the data.")
        encoded.append(ids)
    return encoded


class EncodedRecords(Sequence):
    """Token ids of each of ``records``, encoded by ``encode`` when first asked for and then kept: a run encodes the
    prompts it samples, never a large ``datasets`` set whole. ``encode`` maps one record to its ids."""

    def __init__(self, records: Sequence[Any], encode: Callable[[Any], list[int]]) -> None:
        self.records, self.encode = records, encode
        self._ids: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def encoded(self) -> list[int]:
        """Indices of the records encoded so far."""
        return sorted(self._ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if index not in self._ids:
            self._ids[index] = self.encode(self.records[index])
        return self._ids[index]


def encode_training_records(
    tokenizer,
    records: Sequence[Any],
    use_chat_template: bool,
    max_prompt_tokens: int,
    with_completions: bool,
    why: str = "this objective",
) -> tuple[EncodedRecords, EncodedRecords | None]:
    """Prompt ids (and, ``with_completions``, the given completions' ids) of training ``records``, each encoded when
    the run first samples it (:class:`EncodedRecords`).

    Raises:
        ValueError: ``with_completions`` and some records have no completion (``why`` says who needs them).
    """
    prompts = EncodedRecords(
        records, lambda record: encode_prompts(tokenizer, [record.prompt], use_chat_template, max_prompt_tokens)[0]
    )
    if not with_completions:
        return prompts, None
    missing = count_missing_completions(records)
    if missing:
        raise ValueError(
            f"{why} trains on given completions, but {missing} of {len(records)} training records have none; give "
            'records with a "completion" (name its column with data.completion_field; `lockedopd task make '
            "column_addition --out DIR` writes a task's)."
        )
    return prompts, EncodedRecords(records, lambda record: encode_completions(tokenizer, [record.completion])[0])


def encode_completions(tokenizer, completions: Sequence[str]) -> list[list[int]]:
    """Tokenize given completions as the assistant's reply to a prompt encoded by :func:`encode_prompts`: the text's
    tokens (no special tokens added) followed by the EOS token, where the reply ends."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; given completions need one to end on.")
    stop = eos if isinstance(eos, int) else list(eos)[0]
    encoded = []
    for text in completions:
        if not text:
            raise ValueError("a given completion is empty; every record trained on needs a non-empty completion.")
        encoded.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [stop])
    return encoded


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: ``(B, L)`` → ``(B, L)``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass(frozen=True)
class SamplingSettings:
    """How a :class:`StudentSampler` samples.

    Attributes:
        pad_token_id / eos_token_id: the tokenizer's special ids (``eos_token_id`` may list several, or be None).
        max_new_tokens: the longest completion.
        temperature / top_p: the sampling distribution (raw logits / temperature, nucleus ``top_p``).
    """

    pad_token_id: int
    eos_token_id: int | Sequence[int] | None
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0

    def stop_token_ids(self) -> list[int]:
        """The EOS id(s) as a list (empty without an EOS)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


@runtime_checkable
class StudentSampler(Protocol):
    """Samples one completion per prompt from the student and lays the batch out as a :class:`Rollout`.

    Implementations: :class:`HFStudentSampler` (transformers ``generate`` on the trained model) and
    :class:`~lockedopd.opd.vllm_rollout.VLLMStudentSampler`. A sampler implements :meth:`sample`; subclassing this
    protocol gives it :meth:`generate`, the positional form that the trainer and the evaluation call.
    """

    def sample(self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, seed: int | None) -> Rollout:
        """One completion per prompt (B token-id lists, none empty); reproducible when ``seed`` is given."""
        ...

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        pad_token_id: int,
        eos_token_id: int | Sequence[int] | None,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Rollout:
        """:meth:`sample` with the :class:`SamplingSettings` given one by one; ``ValueError`` for no prompts."""
        if not prompt_ids:
            raise ValueError(f"{type(self).__name__}.generate: no prompts given.")
        settings = SamplingSettings(pad_token_id, eos_token_id, max_new_tokens, temperature, top_p)
        return self.sample(prompt_ids, settings, seed)


class HFStudentSampler(StudentSampler):
    """Samples with transformers ``generate`` on ``model`` itself (``rollout.backend=hf``).

    Args:
        model: a causal LM (or a PEFT wrapper of one) with ``generate``; sampled in eval mode, its mode restored.
        do_sample: ``False`` decodes greedily (temperature and top-p are then ignored).
        seed_per_row: ``False`` (default): ``seed`` seeds torch's global RNG once and ``generate`` samples the whole
            batch from it, so a row's sample depends on the rest of the batch. ``True``: row ``i`` draws from its
            own stream, seeded ``seed + i`` (as the vLLM sampler does), through :class:`PerRowSampling` — a row's
            sample then depends only on its prompt and seed, so a batch split over processes samples what the
            whole batch samples in one process (``rollout.seeding=prompt``).
    """

    def __init__(self, model: nn.Module, do_sample: bool = True, seed_per_row: bool = False) -> None:
        self.model = model
        self.do_sample = do_sample
        self.seed_per_row = seed_per_row

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, seed: int | None) -> Rollout:
        """One ``generate`` call on the left-padded batch; seeds the global torch RNG when ``seed`` is given."""
        model, do_sample = self.model, self.do_sample
        pad_token_id, eos_token_id = settings.pad_token_id, settings.eos_token_id
        device = next(model.parameters()).device
        width = max(len(p) for p in prompt_ids)
        batch = len(prompt_ids)
        input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, width, dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            input_ids[i, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
        per_row = do_sample and self.seed_per_row
        if per_row and seed is None:
            raise ValueError("HFStudentSampler(seed_per_row=True) needs a seed: row i is seeded seed + i.")
        if seed is not None and not per_row:
            torch.manual_seed(seed)
        was_training = model.training
        model.eval()
        extra: dict[str, Any] = {}
        if per_row:  # sampling happens in the processor (Gumbel-max); generate then picks the argmax
            rows = PerRowSampling([seed + i for i in range(batch)], width, settings.temperature, settings.top_p)
            extra = {"logits_processor": LogitsProcessorList([rows])}
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=do_sample and not per_row,
            temperature=settings.temperature if do_sample and not per_row else None,
            top_p=settings.top_p if do_sample and not per_row else None,
            top_k=0 if do_sample and not per_row else None,
            **extra,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            # each process samples alone, stopping when its own rows end: under FSDP2 the trainer gathers the
            # weights first (runtime.fsdp.unsharded); transformers would otherwise sync every step over processes
            synced_gpus=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        model.train(was_training)
        sequences = out.sequences.cpu()
        completion_ids = sequences[:, width:]
        completion_mask = mask_after_eos(completion_ids, eos_token_id)
        completion_ids = completion_ids.masked_fill(~completion_mask, pad_token_id)
        logits = torch.stack(out.logits, dim=1).float().cpu()  # (B, C, V) raw logits of each generated position
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        logprobs = logprobs * completion_mask
        full_mask = torch.cat([attention_mask, completion_mask.long()], dim=1)
        sequences = torch.cat([input_ids, completion_ids], dim=1)
        return Rollout(
            input_ids=sequences,
            attention_mask=full_mask,
            prompt_width=width,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            prompt_lengths=[len(p) for p in prompt_ids],
            logprobs=logprobs,
        )


class PerRowSampling(LogitsProcessor):
    """Sampling with one random stream per row, for ``generate`` in greedy mode (Gumbel-max).

    At generated position ``t`` row ``i`` adds Gumbel noise drawn from a generator seeded with
    ``(seeds[i], t)`` to its logits (divided by ``temperature``, nucleus-filtered to ``top_p``), so the argmax that
    greedy decoding then takes is a sample of softmax(logits / temperature) restricted to the nucleus. A row's draw
    depends only on its seed and its own logits, never on which other rows share the batch.

    Args:
        seeds: one seed per row of the batch.
        prompt_width: the padded prompt length (``t`` counts from it).
        temperature / top_p: the sampling distribution.
    """

    def __init__(self, seeds: Sequence[int], prompt_width: int, temperature: float = 1.0, top_p: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"PerRowSampling: temperature must be > 0, got {temperature}.")
        self.seeds = [int(s) for s in seeds]
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Noisy logits whose argmax is each row's sample at this position."""
        t = input_ids.shape[1] - self.prompt_width
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            logits = TopPLogitsWarper(self.top_p)(input_ids, logits)
        noise = torch.empty_like(logits, device="cpu")
        for row, seed in enumerate(self.seeds):
            generator = torch.Generator().manual_seed((seed * 1_000_003 + t) % (2**63 - 1))
            uniform = torch.rand(logits.shape[-1], generator=generator, dtype=torch.float64)
            noise[row] = -torch.log(-torch.log(uniform.clamp(1e-300, 1.0 - 1e-16)))
        return logits + noise.to(logits.device)


def generate_rollout(model: nn.Module, *args: Any, do_sample: bool = True, **kwargs: Any) -> Rollout:
    """Sample one completion per prompt from ``model``: ``HFStudentSampler(model, do_sample).generate(...)``.

    The remaining arguments are :meth:`StudentSampler.generate`'s: ``prompt_ids, pad_token_id, eos_token_id,
    max_new_tokens, temperature=1.0, top_p=1.0, seed=None``.
    """
    return HFStudentSampler(model, do_sample).generate(*args, **kwargs)


def rollout_from_completions(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    completion_logprobs: Sequence[Sequence[float]] | None,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
) -> Rollout:
    """Lay out completions sampled elsewhere (e.g. by vLLM) exactly as :func:`generate_rollout` does.

    Args:
        prompt_ids: B prompts (token ids).
        completions: B sampled completions (token ids, EOS included where sampling stopped on it).
        completion_logprobs: per-token log-probs of the sampled tokens under the sampler, or ``None`` (zeros).
        pad_token_id / eos_token_id: the tokenizer's special ids.
    """
    if len(prompt_ids) != len(completions) or not prompt_ids:
        raise ValueError(f"rollout_from_completions: {len(prompt_ids)} prompts but {len(completions)} completions.")
    width = max(len(p) for p in prompt_ids)
    span = max(1, max(len(c) for c in completions))
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    completion_ids = torch.full((batch, span), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(batch, span)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        input_ids[i, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[i, width - len(prompt) :] = 1
        if completion:
            completion_ids[i, : len(completion)] = torch.tensor(list(completion), dtype=torch.long)
            if completion_logprobs is not None:
                logprobs[i, : len(completion)] = torch.tensor(list(completion_logprobs[i]), dtype=torch.float32)
    lengths = torch.tensor([len(c) for c in completions])
    completion_mask = mask_after_eos(completion_ids, eos_token_id) & (torch.arange(span) < lengths.unsqueeze(-1))
    completion_ids = completion_ids.masked_fill(~completion_mask, pad_token_id)
    return Rollout(
        input_ids=torch.cat([input_ids, completion_ids], dim=1),
        attention_mask=torch.cat([attention_mask, completion_mask.long()], dim=1),
        prompt_width=width,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        prompt_lengths=[len(p) for p in prompt_ids],
        logprobs=logprobs * completion_mask,
    )


def mask_after_eos(completion_ids: torch.Tensor, eos_token_id) -> torch.Tensor:
    """True up to and including the first EOS of each row."""
    if eos_token_id is None:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids))
    # number of EOS strictly before each position; a token is kept while none came before it
    before = is_eos.long().cumsum(-1) - is_eos.long()
    return before == 0


def student_completion_logprobs(model: nn.Module, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary student log-probs at each completion position, with grad: ``(B, C, V)``.

    Only the last ``C + 1`` positions' logits are computed (``logits_to_keep``).
    """
    device = next(model.parameters()).device
    completion = rollout.completion_ids.shape[1]
    out = model(
        input_ids=rollout.input_ids.to(device),
        attention_mask=rollout.attention_mask.to(device),
        position_ids=position_ids_from_mask(rollout.attention_mask).to(device),
        logits_to_keep=completion + 1,
        use_cache=False,
    )
    logits = out.logits[:, :completion].float()  # position width-1+j predicts completion token j
    if temperature != 1.0:  # dividing by 1 would only copy a (B, C, V) tensor
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)
