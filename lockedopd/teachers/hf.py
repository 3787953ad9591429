"""In-process teacher: a transformers causal LM scored under ``torch.no_grad``."""

from __future__ import annotations

import torch
from torch import nn

from lockedopd.teachers.base import (
    CompletionScoreWriter,
    HiddenStateLogprobs,
    ScorerBase,
    ScoreRequest,
    TeacherScores,
    check_plain_output_layer,
)


class HFTeacher(ScorerBase):
    """Scores student completions with a local transformers model.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(B, L, V)``.
        batch_size: sequences per forward pass (memory knob).
        dtype: cast the model to this dtype for scoring (log-probs are returned in float32).
        temperature: teacher logits are divided by it before the log-softmax.
        keep_hidden_states: return the full distribution as hidden states + output layer
            (:attr:`TeacherScores.full_hidden`, ``(B, C, H)``) instead of ``(B, C, V)`` log-probs, and compute logits
            only at completion positions; the chunked loss (``objective.chunk_size``) turns them into log-probs one
            chunk at a time.
    """

    returns_full_logprobs = True

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
        temperature: float = 1.0,
        keep_hidden_states: bool = False,
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
        self.keep_hidden_states = keep_hidden_states
        if keep_hidden_states:
            check_plain_output_layer(config, "HFTeacher(keep_hidden_states=True)")

    @property
    def device(self) -> torch.device:
        """Device of the teacher's weights."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_completions(self, request: ScoreRequest) -> TeacherScores:
        """Run the model on the sequences, ``batch_size`` at a time, and read the completion positions."""
        prompt_lengths, completion_lengths = request.prompt_lengths, request.completion_lengths
        as_hidden, out = self.completion_writer(request)
        if as_hidden:
            return self._score_from_hidden_states(request, out)
        for rows, ids, attn in self._padded_batches(request.sequences):
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

    def _padded_batches(self, sequences):
        """Yield ``(rows, ids, attention_mask)`` per ``batch_size`` sequences, right-padded (right padding keeps
        positions identical to the unpadded sequence)."""
        for start in range(0, len(sequences), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(sequences)))
            chunk = [list(sequences[i]) for i in rows]
            length = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), length, dtype=torch.long)
            attn = torch.zeros(len(chunk), length, dtype=torch.long)
            for j, seq in enumerate(chunk):
                ids[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attn[j, : len(seq)] = 1
            yield rows, ids, attn

    def _score_from_hidden_states(self, request: ScoreRequest, out: CompletionScoreWriter) -> TeacherScores:
        """Run the decoder only; logits (one row's completion positions at a time) come from the output layer."""
        completion_lengths = request.completion_lengths
        output_layer = self.model.get_output_embeddings()
        hidden = None
        for rows, ids, attn in self._padded_batches(request.sequences):
            states = self.model.get_decoder()(input_ids=ids.to(self.device), attention_mask=attn.to(self.device))
            states = states.last_hidden_state
            if hidden is None:
                hidden = states.new_zeros(len(completion_lengths), max(completion_lengths), states.shape[-1])
            for j, i in enumerate(rows):
                plen, clen = request.prompt_lengths[i], completion_lengths[i]
                if clen == 0:
                    continue
                rows_hidden = states[j, plen - 1 : plen - 1 + clen]
                hidden[i, :clen] = rows_hidden
                pred = torch.log_softmax(output_layer(rows_hidden).float() / self.temperature, dim=-1)
                out.add(i, pred, ids[j, plen : plen + clen])
        scores = out.result()
        scores.full_hidden = HiddenStateLogprobs(hidden, output_layer.weight.detach(), scores.mask, self.temperature)
        return scores
