"""The student and the one fixed synthetic OPD batch every method of a run trains on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["SyntheticBatch", "build_student", "synthetic_batch"]


def build_student(config: dict) -> nn.Module:
    """The student of the experiment, in float32 on ``config["device"]`` (a random Llama built in code, on that
    device, or the converted SmolLM2 cache)."""
    m = config["model"]
    device = torch.device(config.get("device", "cpu"))
    if m["source"] == "tiny":
        from lockedopd.models import build_tiny_llama

        with device:  # initialised where it trains: a multi-billion-parameter student need not pass through the CPU
            return build_tiny_llama(
                m["vocab_size"],
                num_layers=m["num_layers"],
                hidden_size=m["hidden_size"],
                intermediate_size=m["intermediate_size"],
                num_heads=m["num_heads"],
                seed=config["seed"],
                init_std=m["init_std"],
            )
    from lockedopd.models import layers_to_keep, load_smollm2, prune_layers

    model, _ = load_smollm2()
    if m["drop_every"]:
        prune_layers(model, layers_to_keep(model.config.num_hidden_layers, m["drop_every"]))
    return model.float().to(device)


@dataclass
class SyntheticBatch:
    """A fixed OPD micro-batch: a rollout layout plus the teacher's full-vocabulary log-probs as its scores."""

    rollout: Any  # lockedopd.opd.rollout.Rollout
    scores: Any  # lockedopd.teachers.base.TeacherScores (token log-probs, mask and the (B, C, V) full log-probs)

    @property
    def teacher_logprobs(self) -> torch.Tensor:
        """The teacher's ``(B, C, V)`` full log-probs."""
        return self.scores.full_logprobs


def synthetic_batch(config: dict, vocab_size: int) -> SyntheticBatch:
    """Random prompts, completions sampled from a fixed random teacher distribution; same for every method (drawn
    on the CPU, then moved to ``config["device"]``: the same numbers on either)."""
    from lockedopd.opd.rollout import Rollout
    from lockedopd.teachers.base import TeacherScores

    b = config["batch"]
    B, P, C = b["batch_size"], b["prompt_tokens"], b["completion_tokens"]
    g = torch.Generator().manual_seed(config["seed"] + 1)
    teacher = torch.log_softmax(torch.randn(B, C, vocab_size, generator=g) * b["teacher_logit_std"], dim=-1)
    completion = torch.multinomial(teacher.exp().view(-1, vocab_size), 1, generator=g).view(B, C)
    prompt = torch.randint(0, vocab_size, (B, P), generator=g)
    device = torch.device(config.get("device", "cpu"))
    teacher, completion, prompt = teacher.to(device), completion.to(device), prompt.to(device)
    rollout = Rollout(
        input_ids=torch.cat([prompt, completion], dim=1),
        attention_mask=torch.ones(B, P + C, dtype=torch.long, device=device),
        prompt_width=P,
        completion_ids=completion,
        completion_mask=torch.ones(B, C, dtype=torch.bool, device=device),
        prompt_lengths=[P] * B,
        logprobs=torch.zeros(B, C, device=device),
    )
    token_logprobs = teacher.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    scores = TeacherScores(token_logprobs=token_logprobs, mask=rollout.completion_mask, full_logprobs=teacher)
    return SyntheticBatch(rollout, scores)
