"""The teacher-scoring protocol shared by the in-process and the remote (vLLM) teachers.

A scorer receives plain token-id sequences (no HF objects cross this boundary, so a remote server can
implement it) and returns, for every *completion* position, the teacher's log-probability of the token the
student sampled there, plus the teacher's top-k alternatives.

Alignment convention (every scorer must follow it exactly):
    sequence i = prompt tokens ``seq[:prompt_lengths[i]]`` followed by completion tokens
    ``seq[prompt_lengths[i]:]``. Completion position ``j`` of row ``i`` is the token
    ``seq[prompt_lengths[i] + j]``, predicted from ``seq[: prompt_lengths[i] + j]``.
    Outputs are right-padded to ``C = max completion length`` with ``mask == False`` on padding.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class HiddenStateLogprobs:
    """The teacher's full-vocabulary log-probs kept as final hidden states plus the output layer.

    ``(B, C, V)`` log-probs are the largest tensor of an exact-KL step (Qwen3's 151k vocabulary × 4k positions ×
    8 rows is ~20 GB in float32); ``(B, C, H)`` hidden states are ``V / H`` times smaller. Consumers turn the rows
    they need into log-probs (:meth:`logprobs`), e.g. one chunk of completion positions at a time
    (``objective.chunk_size``).

    Attributes:
        hidden: ``(B, C, H)`` final hidden states at the completion positions (after the final norm; zeros on padding).
        output_weight: ``(V, H)`` the teacher's output layer (shared with the teacher, not copied).
        mask: ``(B, C)`` bool, True on real completion positions.
        temperature: logits are divided by it before the log-softmax.
    """

    hidden: torch.Tensor
    output_weight: torch.Tensor
    mask: torch.Tensor
    temperature: float = 1.0

    def logprobs_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 log-probs ``(..., V)`` of hidden states ``(..., H)`` (rows of :attr:`hidden`)."""
        weight = self.output_weight
        logits = torch.nn.functional.linear(hidden.to(device=weight.device, dtype=weight.dtype), weight).float()
        return torch.log_softmax(logits / self.temperature, dim=-1)

    def dense(self) -> torch.Tensor:
        """All ``(B, C, V)`` log-probs at once (zeros on padding), as ``TeacherScores.full_logprobs`` holds them."""
        return self.logprobs_of(self.hidden).cpu() * self.mask.unsqueeze(-1)


@dataclass
class TeacherScores:
    """What a teacher returns for a batch of student completions.

    Attributes:
        token_logprobs: ``(B, C)`` float32, log π_T of the sampled completion token at each position (0 on padding).
        topk_ids: ``(B, C, k)`` int64, the teacher's k most likely next-token ids at each position (sorted by
            decreasing log-prob), or ``None`` when ``top_k == 0``.
        topk_logprobs: ``(B, C, k)`` float32, their log-probs, or ``None`` when ``top_k == 0``.
        mask: ``(B, C)`` bool, True on real completion tokens.
        full_logprobs: ``(B, C, V)`` float32 full-vocabulary log-probs, only when asked for and only from
            in-process teachers (remote servers cannot ship the whole vocabulary).
        full_hidden: the same distribution kept as hidden states + output layer (:class:`HiddenStateLogprobs`),
            instead of ``full_logprobs``, from scorers built with ``keep_hidden_states=True``; see
            :meth:`dense_full_logprobs`.
    """

    token_logprobs: torch.Tensor
    mask: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    full_logprobs: torch.Tensor | None = None
    full_hidden: HiddenStateLogprobs | None = None

    @property
    def has_full_logprobs(self) -> bool:
        """Whether the teacher's full distribution is here, as log-probs or as hidden states."""
        return self.full_logprobs is not None or self.full_hidden is not None

    def dense_full_logprobs(self) -> torch.Tensor | None:
        """``(B, C, V)`` full log-probs, materialised from :attr:`full_hidden` when that is how they came."""
        if self.full_logprobs is not None or self.full_hidden is None:
            return self.full_logprobs
        return self.full_hidden.dense()

    def __post_init__(self) -> None:
        if self.token_logprobs.shape != self.mask.shape:
            raise ValueError(
                f"TeacherScores: token_logprobs {tuple(self.token_logprobs.shape)} and mask "
                f"{tuple(self.mask.shape)} must have the same (batch, completion) shape."
            )


@runtime_checkable
class TeacherScorer(Protocol):
    """Anything that can score student completions with a teacher model.

    Implementations: :class:`lockedopd.teachers.HFTeacher` (in-process transformers model),
    :class:`~lockedopd.teachers.VLLMHiddenStateTeacher` (vLLM runs the network, exact full vocabulary),
    :class:`~lockedopd.teachers.VLLMTeacher` and :class:`~lockedopd.teachers.VLLMServerTeacher` (vLLM prompt
    log-probs: sampled token and top-k only).

    Attributes:
        vocab_size: the teacher's vocabulary size (must equal the student's).
        returns_full_logprobs: whether :meth:`score` honours ``full_logprobs=True`` (full-vocabulary log-probs);
            scorers that return only the sampled token and the top-k set it to ``False``.
    """

    vocab_size: int
    returns_full_logprobs: bool

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        top_k: int = 0,
        full_logprobs: bool = False,
    ) -> TeacherScores:
        """Score each ``sequences[i]`` (prompt + completion token ids, no padding).

        Args:
            sequences: B token-id lists, each prompt followed by completion.
            prompt_lengths: B prompt lengths; ``len(sequences[i]) - prompt_lengths[i]`` is the completion length.
            top_k: how many top alternatives to return per position (0 = none).
            full_logprobs: also return full-vocabulary log-probs (in-process teachers only).
        """
        ...


@dataclass(frozen=True)
class ScoreRequest:
    """A checked call of :meth:`TeacherScorer.score`, with each sequence's completion length."""

    sequences: Sequence[Sequence[int]]
    prompt_lengths: Sequence[int]
    completion_lengths: list[int]
    top_k: int
    full_logprobs: bool


class ScorerBase(abc.ABC):
    """Base of lockedopd's scorers: :meth:`score` checks the request once, then :meth:`score_completions` scores it.

    Subclasses set ``vocab_size``, ``max_length`` (the longest sequence, ``None`` = unbounded) and
    ``returns_full_logprobs``, and implement :meth:`score_completions`; :meth:`check_options` may add checks.
    """

    vocab_size: int
    max_length: int | None
    returns_full_logprobs: bool
    keep_hidden_states: bool = False

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        top_k: int = 0,
        full_logprobs: bool = False,
    ) -> TeacherScores:
        """Score completions; see :class:`lockedopd.teachers.TeacherScorer` for the alignment contract."""
        self.check_options(top_k, full_logprobs)
        completion_lengths = validate_score_request(sequences, prompt_lengths, self.vocab_size, self.max_length)
        return self.score_completions(
            ScoreRequest(sequences, prompt_lengths, completion_lengths, top_k, full_logprobs)
        )

    def check_options(self, top_k: int, full_logprobs: bool) -> None:
        """Raise ``ValueError`` unless ``top_k`` is in ``[0, vocab_size]`` and full log-probs can be returned."""
        who = type(self).__name__
        if full_logprobs and not self.returns_full_logprobs:
            raise ValueError(
                f"{who}.score: full_logprobs=True is not available from this scorer; use an objective that needs no "
                "full distribution (`objective.name=pg` or `topk_reverse_kl`)."
            )
        if top_k < 0 or top_k > self.vocab_size:
            raise ValueError(f"{who}.score: top_k must be in [0, {self.vocab_size}], got {top_k}.")

    def completion_writer(self, request: ScoreRequest) -> tuple[bool, CompletionScoreWriter]:
        """Whether the full distribution goes out as hidden states (``keep_hidden_states`` and a request for full
        log-probs), and the writer of the request's scores (full log-probs written only when not)."""
        as_hidden = self.keep_hidden_states and request.full_logprobs
        writer = CompletionScoreWriter(
            request.completion_lengths, self.vocab_size, request.top_k, request.full_logprobs and not as_hidden
        )
        return as_hidden, writer

    @abc.abstractmethod
    def score_completions(self, request: ScoreRequest) -> TeacherScores:
        """Score a request that :meth:`score` has checked."""


class CompletionScoreWriter:
    """Lays per-sequence completion log-probs out as :class:`TeacherScores` (right-padded, masked).

    In-process scorers compute, for each sequence, the ``(clen, V)`` log-probs at its completion positions and
    :meth:`add` them; :meth:`result` returns the batch in the protocol's layout.
    """

    def __init__(self, completion_lengths: Sequence[int], vocab_size: int, top_k: int, full_logprobs: bool) -> None:
        batch, width = len(completion_lengths), max(completion_lengths)
        self.top_k = top_k
        self.token_logprobs = torch.zeros(batch, width)
        self.mask = torch.zeros(batch, width, dtype=torch.bool)
        self.topk_ids = torch.zeros(batch, width, top_k, dtype=torch.long) if top_k else None
        self.topk_logprobs = torch.zeros(batch, width, top_k) if top_k else None
        self.full = torch.zeros(batch, width, vocab_size) if full_logprobs else None

    def add(self, row: int, logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        """Row ``row``: ``logprobs`` ``(clen, V)`` predicting the completion tokens ``targets`` ``(clen,)``."""
        clen = targets.shape[0]
        if clen == 0:
            return
        logprobs = logprobs.float().cpu()
        self.token_logprobs[row, :clen] = logprobs.gather(-1, targets.cpu().unsqueeze(-1)).squeeze(-1)
        self.mask[row, :clen] = True
        if self.top_k:
            values, indices = logprobs.topk(self.top_k, dim=-1)
            self.topk_logprobs[row, :clen], self.topk_ids[row, :clen] = values, indices
        if self.full is not None:
            self.full[row, :clen] = logprobs

    def result(self) -> TeacherScores:
        """The collected batch."""
        return TeacherScores(self.token_logprobs, self.mask, self.topk_ids, self.topk_logprobs, self.full)


#: Model-config keys that change logits after the output layer; such models cannot be scored from hidden states.
LOGIT_POSTPROCESSING_KEYS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def check_plain_output_layer(config, who: str) -> None:
    """Raise ``ValueError`` when a model (its HF config, or config.json as a dict) post-processes its logits after
    the output layer (Gemma's soft-capping, Cohere's logit scale): log-probs from hidden states would be wrong."""
    if config is None:
        return
    if not isinstance(config, dict):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    config = config.get("text_config") or config
    for key in LOGIT_POSTPROCESSING_KEYS:
        if config.get(key) not in (None, 1, 1.0):
            raise ValueError(
                f"{who}: the model post-processes its logits ({key}={config[key]}), which log-probs computed from "
                "hidden states and the output layer do not reproduce; use full log-probs (objective.chunk_size=0)."
            )


def validate_score_request(
    sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], vocab_size: int, max_length: int | None
) -> list[int]:
    """Check a scoring request and return the completion lengths.

    Raises:
        ValueError: mismatched batch sizes, a prompt length outside the sequence, an empty prompt,
            a token id outside the teacher's vocabulary, or a sequence longer than the teacher's context.
    """
    if len(sequences) != len(prompt_lengths):
        raise ValueError(
            f"score(): got {len(sequences)} sequences but {len(prompt_lengths)} prompt lengths; pass one prompt "
            "length per sequence."
        )
    if len(sequences) == 0:
        raise ValueError("score(): empty batch; pass at least one sequence.")
    completion_lengths = []
    for i, (seq, plen) in enumerate(zip(sequences, prompt_lengths)):
        if plen < 1 or plen > len(seq):
            raise ValueError(
                f"score(): sequence {i} has length {len(seq)} but prompt length {plen}; the prompt must hold at "
                "least one token and fit inside the sequence."
            )
        if len(seq) and (max(seq) >= vocab_size or min(seq) < 0):
            raise ValueError(
                f"score(): sequence {i} holds token id {max(seq)} but the teacher's vocabulary has {vocab_size} "
                "entries: teacher and student must share one tokenizer/vocabulary."
            )
        if max_length is not None and len(seq) > max_length:
            raise ValueError(
                f"score(): sequence {i} has {len(seq)} tokens, longer than the teacher's context of {max_length}; "
                "shorten prompts or lower rollout.max_new_tokens."
            )
        completion_lengths.append(len(seq) - plen)
    return completion_lengths
