"""Held-out evaluation.

- :func:`evaluate_reverse_kl`: the mean per-token reverse KL(student ‖ teacher) on the student's own samples (the
  on-policy metric; mode-seeking). :func:`evaluate_reverse_kl_seeds` averages it over several sampling seeds.
- :func:`evaluate_fixed_text_kl`: KL on fixed text, the teacher's greedy completions of the held-out prompts
  (:func:`teacher_greedy_completions`, made once and cached by :func:`load_or_make_fixed_text`): whether the student
  still covers what the teacher would say, which the on-policy metric does not see.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lockedopd.opd.objectives import forward_kl_per_token, masked_mean, reverse_kl_per_token
from lockedopd.opd.rollout import (
    HFStudentSampler,
    StudentSampler,
    rollout_from_completions,
    student_completion_logprobs,
)
from lockedopd.teachers.base import TeacherScorer

FIXED_TEXT_FORMAT = 1


@dataclass
class EvalResult:
    """Held-out metrics. ``exact`` says whether the KL is the full-vocabulary one or the sampled estimate."""

    reverse_kl: float
    sampled_reverse_kl: float
    tokens: int
    exact: bool
    mean_completion_tokens: float
    reverse_kl_per_seed: list[float] | None = None
    fixed_text: FixedTextResult | None = None

    def as_dict(self, prefix: str = "eval_") -> dict:
        """Flat dict for metrics.jsonl (per-seed KLs and fixed-text metrics only when measured)."""
        out = {
            f"{prefix}reverse_kl": self.reverse_kl,
            f"{prefix}sampled_reverse_kl": self.sampled_reverse_kl,
            f"{prefix}tokens": self.tokens,
            f"{prefix}kl_exact": self.exact,
            f"{prefix}mean_completion_tokens": self.mean_completion_tokens,
        }
        if self.reverse_kl_per_seed is not None:
            out[f"{prefix}reverse_kl_per_seed"] = list(self.reverse_kl_per_seed)
        if self.fixed_text is not None:
            out.update(self.fixed_text.as_dict(prefix))
        return out


@dataclass
class FixedTextResult:
    """Student vs teacher on fixed (teacher-written) text; token-weighted means over its completion tokens.

    Attributes:
        reverse_kl: exact KL(π_S ‖ π_T) per token.
        forward_kl: exact KL(π_T ‖ π_S) per token (coverage: large when the student drops the teacher's modes).
        nll: −log π_S of the teacher's tokens, per token.
        tokens: completion tokens scored.
    """

    reverse_kl: float
    forward_kl: float
    nll: float
    tokens: int

    def as_dict(self, prefix: str = "eval_") -> dict:
        """Flat dict for metrics.jsonl (``eval_fixed_text_kl`` is the reverse KL)."""
        return {
            f"{prefix}fixed_text_kl": self.reverse_kl,
            f"{prefix}fixed_text_forward_kl": self.forward_kl,
            f"{prefix}fixed_text_nll": self.nll,
            f"{prefix}fixed_text_tokens": self.tokens,
        }


@dataclass
class FixedText:
    """Teacher completions of a prompt set, cached as JSON.

    Attributes:
        prompt_ids: the prompts (token ids).
        completion_ids: the teacher's greedy completion of each prompt (EOS included where it stopped on it).
        max_new_tokens: the length limit they were made with.
        teacher: a description of the teacher that wrote them (checked when the cache is reused).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    max_new_tokens: int
    teacher: str = ""
    format: int = field(default=FIXED_TEXT_FORMAT)

    def key(self) -> str:
        """A short hash of prompts, limit and teacher: what a cache must match to be reused."""
        return fixed_text_key(self.prompt_ids, self.max_new_tokens, self.teacher)


def fixed_text_key(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, teacher: str) -> str:
    """Hash of what determines a :class:`FixedText` (prompts, length limit, teacher description)."""
    blob = json.dumps([[list(p) for p in prompt_ids], int(max_new_tokens), teacher, FIXED_TEXT_FORMAT])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate_reverse_kl(
    student: nn.Module,
    teacher: TeacherScorer,
    prompt_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    eos_token_id,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    temperature: float = 1.0,
    exact: bool = True,
    sampler: StudentSampler | None = None,
    chunk_size: int = 0,
) -> EvalResult:
    """Sample the student on held-out prompts (seeded, temperature ``temperature``) and measure KL to the teacher.

    With ``exact=True`` (needs a teacher that returns full log-probs) the per-token KL is the exact
    full-vocabulary reverse KL; otherwise the sampled estimate log π_S(y) − log π_T(y). Both are token-weighted.
    ``sampler`` (e.g. a :class:`~lockedopd.opd.vllm_rollout.VLLMStudentSampler`) samples instead of
    :class:`~lockedopd.opd.rollout.HFStudentSampler` on ``student``. ``chunk_size > 0`` computes the KLs that many
    completion tokens at a time (:func:`~lockedopd.opd.chunked_loss.completion_kl_statistics`): no ``(B, C, V)``
    tensor, same values up to rounding.
    """
    from lockedopd.opd.chunked_loss import completion_kl_statistics

    if not prompt_ids:
        raise ValueError("evaluate_reverse_kl: no held-out prompts.")
    kl_sum = sampled_sum = 0.0
    tokens = 0
    rows = 0
    was_training = student.training
    student.eval()
    sampler = sampler if sampler is not None else HFStudentSampler(student)
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        rollout = sampler.generate(
            chunk, pad_token_id, eos_token_id, max_new_tokens, temperature=temperature, seed=seed + start
        )
        scores = teacher.score(rollout.sequences(), rollout.prompt_lengths, full_logprobs=exact)
        mask = rollout.completion_mask
        if chunk_size > 0:
            student_tok, exact_kl = completion_kl_statistics(student, rollout, scores, chunk_size)
            student_tok, exact_kl = student_tok.cpu(), None if exact_kl is None else exact_kl.cpu()
        else:
            student_lp = student_completion_logprobs(student, rollout)  # on the student's device
            ids = rollout.completion_ids.to(student_lp.device)
            student_tok = student_lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).cpu()
            exact_kl = (
                reverse_kl_per_token(student_lp, scores.dense_full_logprobs().to(student_lp.device)).cpu()
                if exact
                else None
            )
        sampled = student_tok - scores.token_logprobs
        n = int(mask.sum())
        sampled_sum += float(masked_mean(sampled, mask)) * n
        if exact:
            kl_sum += float(masked_mean(exact_kl, mask)) * n
        tokens += n
        rows += len(chunk)
    student.train(was_training)
    sampled_kl = sampled_sum / max(tokens, 1)
    return EvalResult(
        reverse_kl=kl_sum / max(tokens, 1) if exact else sampled_kl,
        sampled_reverse_kl=sampled_kl,
        tokens=tokens,
        exact=exact,
        mean_completion_tokens=tokens / max(rows, 1),
    )


def mean_eval_results(results: Sequence[EvalResult]) -> EvalResult:
    """Average evaluations of the same checkpoint under different sampling seeds.

    KLs and the mean completion length are plain means of the per-seed values (each seed weighs the same);
    ``tokens`` is the total over seeds; ``reverse_kl_per_seed`` keeps the per-seed KLs.
    """
    if not results:
        raise ValueError("mean_eval_results: no evaluations to average.")
    n = len(results)
    return EvalResult(
        reverse_kl=sum(r.reverse_kl for r in results) / n,
        sampled_reverse_kl=sum(r.sampled_reverse_kl for r in results) / n,
        tokens=sum(r.tokens for r in results),
        exact=all(r.exact for r in results),
        mean_completion_tokens=sum(r.mean_completion_tokens for r in results) / n,
        reverse_kl_per_seed=[r.reverse_kl for r in results],
    )


def evaluate_reverse_kl_seeds(
    student: nn.Module,
    teacher: TeacherScorer,
    prompt_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    eos_token_id,
    max_new_tokens: int,
    batch_size: int,
    seeds: Sequence[int],
    temperature: float = 1.0,
    exact: bool = True,
    sampler=None,
    chunk_size: int = 0,
) -> EvalResult:
    """:func:`evaluate_reverse_kl` under each sampling seed of ``seeds``, averaged (:func:`mean_eval_results`).

    With one seed this is exactly :func:`evaluate_reverse_kl` (no per-seed list). The seeds after the first run
    inside ``torch.random.fork_rng``, so the global RNG state afterwards is the one a single-seed evaluation
    leaves: adding sampling seeds never changes what training draws next.
    """
    if not seeds:
        raise ValueError("evaluate_reverse_kl_seeds: give at least one sampling seed.")
    args = (student, teacher, prompt_ids, pad_token_id, eos_token_id, max_new_tokens, batch_size)
    kwargs = {"temperature": temperature, "exact": exact, "sampler": sampler, "chunk_size": chunk_size}
    first = evaluate_reverse_kl(*args, seed=seeds[0], **kwargs)
    if len(seeds) == 1:
        return first
    results = [first]
    with torch.random.fork_rng(devices=[]):
        for seed in seeds[1:]:
            results.append(evaluate_reverse_kl(*args, seed=seed, **kwargs))
    return mean_eval_results(results)


@torch.no_grad()
def teacher_greedy_completions(
    teacher: TeacherScorer,
    prompt_ids: Sequence[Sequence[int]],
    eos_token_id,
    max_new_tokens: int,
    batch_size: int,
) -> list[list[int]]:
    """The teacher's greedy completion of each prompt, decoded through the scoring protocol alone.

    Every round appends a placeholder token to each unfinished sequence and asks the scorer for its top-1 at that
    position (the teacher's most likely next token given everything before it), then puts that token in the
    placeholder's place. Works with every :class:`TeacherScorer` (``top_k=1`` only), at ``max_new_tokens`` scoring
    calls per batch. A completion stops after an EOS token (kept) or at ``max_new_tokens``.
    """
    if not prompt_ids:
        raise ValueError("teacher_greedy_completions: no prompts given.")
    eos_ids = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    placeholder = min(eos_ids) if eos_ids else 0
    completions: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(prompt_ids), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompt_ids))))
        for _ in range(max_new_tokens):
            live = [i for i in rows if not (completions[i] and completions[i][-1] in eos_ids)]
            if not live:
                break
            sequences = [list(prompt_ids[i]) + completions[i] + [placeholder] for i in live]
            plens = [len(prompt_ids[i]) for i in live]
            scores = teacher.score(sequences, plens, top_k=1)
            if scores.topk_ids is None:
                raise ValueError(
                    f"{type(teacher).__name__}.score(top_k=1) returned no top-k ids; greedy decoding needs a scorer "
                    "that honours top_k."
                )
            for row, i in enumerate(live):
                completions[i].append(int(scores.topk_ids[row, len(completions[i]), 0]))
    return completions


def load_or_make_fixed_text(
    path: str | Path,
    teacher: TeacherScorer,
    prompt_ids: Sequence[Sequence[int]],
    eos_token_id,
    max_new_tokens: int,
    batch_size: int,
    teacher_description: str = "",
) -> FixedText:
    """The cached teacher completions at ``path``, made with :func:`teacher_greedy_completions` if absent.

    ``path`` ending in ``.json`` is one cache file: one made for other prompts, another length limit or another
    teacher raises ``ValueError`` (delete it or point at another path). Any other ``path`` is a directory holding
    one ``<key>.json`` per prompt set (e.g. a benchmark grid whose training seeds hold out different prompts).
    Written atomically, so several runs can share a cache.
    """
    path = Path(path)
    key = fixed_text_key(prompt_ids, max_new_tokens, teacher_description)
    if path.suffix != ".json":
        path = path / f"{key}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        cached = FixedText(**{k: v for k, v in data.items() if k != "key"})
        if cached.key() != key:
            raise ValueError(
                f"{path} holds teacher completions of other prompts / max_new_tokens / teacher (key {cached.key()}, "
                f"this run needs {key}); delete it or set eval_fixed_text_path to another file."
            )
        return cached
    completions = teacher_greedy_completions(teacher, prompt_ids, eos_token_id, max_new_tokens, batch_size)
    fixed = FixedText([list(p) for p in prompt_ids], completions, int(max_new_tokens), teacher_description)
    from lockedopd.runtime.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**fixed.__dict__, "key": fixed.key()}))
    return fixed


@torch.no_grad()
def evaluate_fixed_text_kl(
    student: nn.Module,
    teacher: TeacherScorer,
    fixed: FixedText,
    pad_token_id: int,
    eos_token_id,
    batch_size: int,
) -> FixedTextResult:
    """Per-token KL between student and teacher on the fixed completions (token-weighted over all of them).

    Needs a teacher that returns full-vocabulary log-probs (``returns_full_logprobs``).
    """
    if not getattr(teacher, "returns_full_logprobs", False):
        raise ValueError(
            f"KL on fixed text needs full-vocabulary teacher log-probs, which {type(teacher).__name__} does not "
            "return; set teacher.eval_backend=hf (or eval_fixed_text=false)."
        )
    sums = {"reverse": 0.0, "forward": 0.0, "nll": 0.0}
    tokens = 0
    was_training = student.training
    student.eval()
    for start in range(0, len(fixed.prompt_ids), batch_size):
        prompts = fixed.prompt_ids[start : start + batch_size]
        completions = fixed.completion_ids[start : start + batch_size]
        keep = [i for i, c in enumerate(completions) if c]
        if not keep:
            continue
        prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
        rollout = rollout_from_completions(prompts, completions, None, pad_token_id, eos_token_id)
        scores = teacher.score(rollout.sequences(), rollout.prompt_lengths, full_logprobs=True)
        student_lp = student_completion_logprobs(student, rollout)
        mask = rollout.completion_mask
        n = int(mask.sum())
        nll = -student_lp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
        teacher_lp = scores.dense_full_logprobs()
        sums["reverse"] += float(masked_mean(reverse_kl_per_token(student_lp, teacher_lp), mask)) * n
        sums["forward"] += float(masked_mean(forward_kl_per_token(student_lp, teacher_lp), mask)) * n
        sums["nll"] += float(masked_mean(nll, mask)) * n
        tokens += n
    student.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate_fixed_text_kl: the fixed text has no completion tokens to score.")
    return FixedTextResult(sums["reverse"] / tokens, sums["forward"] / tokens, sums["nll"] / tokens, tokens)
