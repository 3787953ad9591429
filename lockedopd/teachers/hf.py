"""In-process teacher: a transformers causal LM scored under ``torch.no_grad``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lockedopd.teachers.base import TeacherScores, validate_score_request


class HFTeacher:
    """Scores student completions with a local transformers model.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(B, L, V)``.
        batch_size: sequences per forward pass (memory knob).
        dtype: cast the model to this dtype for scoring (log-probs are returned in float32).
        temperature: teacher logits are divided by it before the log-softmax.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
        temperature: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"HFTeacher: batch_size must be >= 1, got {batch_size}.")
        if temperature <= 0:
            raise ValueError(f"HFTeacher: temperature must be > 0, got {temperature}.")
        self.model = model.eval()
        if dtype is not None:
            self.model.to(dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size
        self.temperature = temperature
        config = getattr(model, "config", None)
        self.vocab_size = int(getattr(config, "vocab_size", None) or model.get_output_embeddings().weight.shape[0])
        self.max_length = getattr(config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        """Device of the teacher's weights."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        top_k: int = 0,
        full_logprobs: bool = False,
    ) -> TeacherScores:
        """Score completions; see :class:`lockedopd.teachers.TeacherScorer` for the alignment contract."""
        completion_lengths = validate_score_request(sequences, prompt_lengths, self.vocab_size, self.max_length)
        if top_k < 0 or top_k > self.vocab_size:
            raise ValueError(f"HFTeacher.score: top_k must be in [0, {self.vocab_size}], got {top_k}.")
        batch, max_completion = len(sequences), max(completion_lengths)
        token_lp = torch.zeros(batch, max_completion)
        mask = torch.zeros(batch, max_completion, dtype=torch.bool)
        topk_ids = torch.zeros(batch, max_completion, top_k, dtype=torch.long) if top_k else None
        topk_lp = torch.zeros(batch, max_completion, top_k) if top_k else None
        full = torch.zeros(batch, max_completion, self.vocab_size) if full_logprobs else None

        for start in range(0, batch, self.batch_size):
            rows = range(start, min(start + self.batch_size, batch))
            chunk = [list(sequences[i]) for i in rows]
            length = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), length, dtype=torch.long)
            attn = torch.zeros(len(chunk), length, dtype=torch.long)
            for j, seq in enumerate(chunk):  # right padding keeps positions identical to the unpadded sequence
                ids[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attn[j, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
            for j, i in enumerate(rows):
                plen, clen = prompt_lengths[i], completion_lengths[i]
                if clen == 0:
                    continue
                # position p predicts token p + 1, so completion token j comes from position plen - 1 + j
                # only completion positions are read: normalise those, not the prompt's
                pred = torch.log_softmax(logits[j, plen - 1 : plen - 1 + clen].float() / self.temperature, dim=-1)
                pred = pred.cpu()
                targets = ids[j, plen : plen + clen]
                token_lp[i, :clen] = pred.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                mask[i, :clen] = True
                if top_k:
                    values, indices = pred.topk(top_k, dim=-1)
                    topk_lp[i, :clen], topk_ids[i, :clen] = values, indices
                if full is not None:
                    full[i, :clen] = pred
        return TeacherScores(token_lp, mask, topk_ids, topk_lp, full)
