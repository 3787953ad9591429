"""Scoring from vLLM prompt log-probs (engine and server teachers): option checks and the TeacherScores layout.

vLLM scores a sequence by running it as a *prompt* with ``prompt_logprobs=K``: for every prompt position
``p >= 1`` it returns the log-probability of ``seq[p]`` given ``seq[:p]`` plus the K most likely tokens there
(position 0 has no prediction and comes back as ``None``). The actual token is always included, in addition
to the top-K, so a position holds K or K + 1 entries. Both the in-process engine
(:class:`~lockedopd.teachers.vllm_engine.VLLMTeacher`) and the HTTP client
(:class:`~lockedopd.teachers.vllm_server.VLLMServerTeacher`) normalise their output to one list per sequence of
``{token_id: (logprob, rank)}`` dicts and hand it to :func:`scores_from_prompt_logprobs`, which lays it out
exactly like :class:`~lockedopd.teachers.hf.HFTeacher` does.

Nothing here imports vLLM.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lockedopd.teachers.base import ScorerBase, ScoreRequest, TeacherScores

#: One prompt position: token id -> (log-prob, rank or None). Rank 1 is the most likely token.
PositionLogprobs = Mapping[int, tuple[float, int | None]]


def reject_full_logprobs(full_logprobs: bool, who: str) -> None:
    """Raise the standard error when a vLLM-backed scorer is asked for full-vocabulary log-probs."""
    if full_logprobs:
        raise ValueError(
            f"{who}.score: full_logprobs=True is not available: remote/vLLM scorers return the sampled token's "
            "log-prob and the top-k alternatives only. Use an objective that needs no full distribution "
            "(`objective=pg` or `objective=topk_reverse_kl`), or score in-process with `teacher.backend=hf`."
        )


def scores_from_prompt_logprobs(
    prompt_logprobs: Sequence[Sequence[PositionLogprobs | None] | None],
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    completion_lengths: Sequence[int],
    top_k: int,
    who: str = "VLLMTeacher",
) -> TeacherScores:
    """Lay out per-sequence prompt log-probs as :class:`TeacherScores` (HFTeacher's shapes and positions).

    Args:
        prompt_logprobs: for each sequence, one entry per token (``None`` at position 0), each mapping token
            id -> ``(logprob, rank)``; entries of sequences with an empty completion may be ``None`` entirely.
        sequences, prompt_lengths, completion_lengths: the validated request.
        top_k: how many alternatives to return (each position must hold at least that many ranked entries).
    """
    batch, max_completion = len(sequences), max(completion_lengths)
    token_lp = torch.zeros(batch, max_completion)
    mask = torch.zeros(batch, max_completion, dtype=torch.bool)
    topk_ids = torch.zeros(batch, max_completion, top_k, dtype=torch.long) if top_k else None
    topk_lp = torch.zeros(batch, max_completion, top_k) if top_k else None
    for i, (seq, plen, clen) in enumerate(zip(sequences, prompt_lengths, completion_lengths)):
        if clen == 0:
            continue
        positions = prompt_logprobs[i]
        if positions is None or len(positions) != len(seq):
            got = "none" if positions is None else len(positions)
            raise RuntimeError(
                f"{who}: sequence {i} has {len(seq)} tokens but vLLM returned prompt log-probs for {got} positions."
            )
        row_lp, row_ids, row_topk = [], [], []
        for j in range(clen):
            pos = plen + j  # completion token j = seq[plen + j], predicted from seq[:plen + j]
            entry = positions[pos]
            target = int(seq[pos])
            if entry is None or target not in entry:
                raise RuntimeError(
                    f"{who}: vLLM returned no log-prob for token {target} at position {pos} of sequence {i}."
                )
            row_lp.append(entry[target][0])
            if top_k:
                # order by rank (vLLM's own order); fall back to the log-prob, ties broken by token id
                ranked = sorted(
                    entry.items(),
                    key=lambda kv: (kv[1][1] if kv[1][1] is not None else math.inf, -kv[1][0], kv[0]),
                )
                ranked = [kv for kv in ranked if kv[1][1] is None or kv[1][1] <= top_k][:top_k]
                if len(ranked) < top_k:
                    raise RuntimeError(
                        f"{who}: vLLM returned {len(ranked)} ranked alternatives at position {pos} of sequence "
                        f"{i}, fewer than top_k={top_k}."
                    )
                row_ids.append([kv[0] for kv in ranked])
                row_topk.append([kv[1][0] for kv in ranked])
        token_lp[i, :clen] = torch.tensor(row_lp, dtype=torch.float32)
        mask[i, :clen] = True
        if top_k:
            topk_ids[i, :clen] = torch.tensor(row_ids, dtype=torch.long)
            topk_lp[i, :clen] = torch.tensor(row_topk, dtype=torch.float32)
    return TeacherScores(token_lp, mask, topk_ids, topk_lp, None)


class PromptLogprobScorer(ScorerBase):
    """The scoring flow shared by the vLLM prompt-log-prob scorers: fetch prompt log-probs, lay them out.

    Subclasses set ``vocab_size``, ``max_length`` and ``top_k_max`` and implement :meth:`_fetch_prompt_logprobs`.
    """

    top_k_max: int
    returns_full_logprobs = False

    @abc.abstractmethod
    def _fetch_prompt_logprobs(
        self, sequences: list[list[int]], top_k: int
    ) -> list[Sequence[PositionLogprobs | None]]:
        """Per sequence, one entry per token (``None`` at position 0) mapping token id -> (logprob, rank)."""

    def check_options(self, top_k: int, full_logprobs: bool) -> None:
        """No full-vocabulary log-probs; ``top_k`` in ``[0, min(top_k_max, vocab_size)]``."""
        who = type(self).__name__
        reject_full_logprobs(full_logprobs, who)
        super().check_options(top_k, full_logprobs)
        if top_k > self.top_k_max:
            raise ValueError(
                f"{who}.score: top_k={top_k} exceeds top_k_max={self.top_k_max}, the most log-probs per position the "
                f"vLLM engine was started to return; recreate the teacher with top_k_max>={top_k} (server: start it "
                f"with `--max-logprobs {top_k}`)."
            )

    def score_completions(self, request: ScoreRequest) -> TeacherScores:
        """Fetch the prompt log-probs of the sequences with a completion and lay them out."""
        who = type(self).__name__
        sequences, completion_lengths, top_k = request.sequences, request.completion_lengths, request.top_k
        todo = [i for i, clen in enumerate(completion_lengths) if clen > 0]
        per_sequence: list[Any] = [None] * len(sequences)
        if todo:
            fetched = self._fetch_prompt_logprobs([[int(t) for t in sequences[i]] for i in todo], top_k)
            for i, positions in zip(todo, fetched):
                per_sequence[i] = positions
        return scores_from_prompt_logprobs(
            per_sequence, sequences, request.prompt_lengths, completion_lengths, top_k, who=who
        )
