"""In-process teacher: a transformers causal LM scored under ``torch.no_grad``."""

from __future__ import annotations

import torch
from torch import nn

from lockedopd.teachers.base import CompletionScoreWriter, ScorerBase, ScoreRequest, TeacherScores


class HFTeacher(ScorerBase):
    """Scores student completions with a local transformers model.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(B, L, V)``.
        batch_size: sequences per forward pass (memory knob).
        dtype: cast the model to this dtype for scoring (log-probs are returned in float32).
        temperature: teacher logits are divided by it before the log-softmax.
    """

    returns_full_logprobs = True

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
    def score_completions(self, request: ScoreRequest) -> TeacherScores:
        """Run the model on the sequences, ``batch_size`` at a time, and read the completion positions."""
        sequences, prompt_lengths = request.sequences, request.prompt_lengths
        completion_lengths = request.completion_lengths
        out = CompletionScoreWriter(completion_lengths, self.vocab_size, request.top_k, request.full_logprobs)
        batch = len(sequences)
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
                out.add(i, pred, ids[j, plen : plen + clen])
        return out.result()
