"""Exact full-vocabulary teacher log-probs with vLLM running the teacher's network.

vLLM's prompt log-probs give only a top-k per position, and OPD's exact reverse KL needs the teacher's whole
next-token distribution. Here vLLM runs as a pooling engine (``token_embed`` task, every position, no activation):
it returns each position's final hidden state, and the teacher's output layer (``lm_head``, read once from the
model directory: vocab × hidden weights, ~20% of a 135M model, ~2% of a 30B one) turns them into logits in this
process. The result is what :class:`lockedopd.teachers.HFTeacher` returns (token, top-k and full log-probs), with
vLLM's batching and kernels doing the expensive part.

Models whose logits are post-processed after the output layer (Gemma's final soft-capping, Cohere's logit scale)
are refused: the output layer alone would not reproduce their log-probs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lockedopd.runtime.vllm_runtime import import_vllm, start_llm
from lockedopd.teachers.base import (
    LOGIT_POSTPROCESSING_KEYS,
    HiddenStateLogprobs,
    ScorerBase,
    ScoreRequest,
    TeacherScores,
)

__all__ = ["LOGIT_POSTPROCESSING_KEYS", "VLLMHiddenStateTeacher", "load_output_layer"]


def load_output_layer(model_dir: str | os.PathLike) -> torch.Tensor:
    """The ``(vocab, hidden)`` output-layer weight of a HF model directory, in float32.

    Reads ``lm_head.weight`` from the directory's safetensors files, or the input embedding when the model ties
    them (``tie_word_embeddings``). Raises ``FileNotFoundError`` / ``ValueError`` naming what is missing.
    """
    root = Path(model_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{root} has no config.json; pass a Hugging Face model directory as the teacher.")
    config = json.loads(config_path.read_text())
    config = config.get("text_config", config)
    for key in LOGIT_POSTPROCESSING_KEYS:
        if config.get(key) not in (None, 1, 1.0):
            raise ValueError(
                f"{root}: the model post-processes its logits ({key}={config[key]}), which hidden-state scoring does "
                "not reproduce; use teacher.vllm_scoring=prompt_logprobs or teacher.backend=hf."
            )
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root} holds no *.safetensors weights; save the teacher with safetensors.")
    tied = bool(config.get("tie_word_embeddings", False))
    for wanted in ("lm_head.weight", "embed_tokens.weight") if tied else ("lm_head.weight",):
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if name == wanted or (wanted == "embed_tokens.weight" and name.endswith(".embed_tokens.weight")):
                        return handle.get_tensor(name).float()
    raise ValueError(
        f"{root}: no lm_head.weight in its safetensors files"
        + ("" if tied else " and tie_word_embeddings is false")
        + "; the teacher's output layer is needed to turn hidden states into log-probs."
    )


class VLLMHiddenStateTeacher(ScorerBase):
    """Scores student completions exactly (full vocabulary) with vLLM running the teacher's network.

    Args:
        model: path of a Hugging Face model directory (config, safetensors weights, tokenizer files).
        dtype: dtype vLLM runs the network in (``"float32"`` for parity with an fp32 HF teacher).
        max_model_len: the longest sequence to score; defaults to the model's context.
        temperature: teacher logits are divided by it before the log-softmax.
        llm: an existing pooling ``vllm.LLM`` (``runner="pooling"``, ``PoolerConfig(task="token_embed",
            tok_pooling_type="ALL", use_activation=False)``) to reuse; ``model`` then only locates the output layer
            (default: the LLM's own model path).
        keep_hidden_states: return the full distribution as the completion positions' hidden states + the output
            layer (:attr:`TeacherScores.full_hidden`) instead of ``(B, C, V)`` log-probs; the chunked loss
            (``objective.chunk_size``) turns them into log-probs one chunk at a time.
        **engine_kwargs: passed to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``).

    Scripts that create one should keep top-level code under ``if __name__ == "__main__":``.
    """

    returns_full_logprobs = True

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        dtype: str = "float32",
        max_model_len: int | None = None,
        temperature: float = 1.0,
        llm: Any = None,
        keep_hidden_states: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"VLLMHiddenStateTeacher: temperature must be > 0, got {temperature}.")
        if llm is None and model is None:
            raise ValueError("VLLMHiddenStateTeacher: pass `model` (a HF model directory) or an existing `llm`.")
        vllm = import_vllm(type(self).__name__)
        self._tokens_prompt = vllm.TokensPrompt
        # read the output layer before starting an engine, so a directory that cannot work fails fast
        output_weight = load_output_layer(model) if model is not None else None
        if llm is None:
            from vllm.config import PoolerConfig

            kwargs: dict[str, Any] = {
                "model": str(model),
                "runner": "pooling",
                "convert": "embed",
                "pooler_config": PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False),
                "dtype": dtype,
            }
            if max_model_len is not None:
                kwargs["max_model_len"] = max_model_len
            llm = start_llm(type(self).__name__, **{**kwargs, **engine_kwargs})
        self.llm = llm
        model_config = llm.llm_engine.model_config
        self.model_name = model_config.model
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_length = int(model_config.max_model_len)
        self.temperature = temperature
        self.keep_hidden_states = keep_hidden_states
        self.output_weight = output_weight if output_weight is not None else load_output_layer(self.model_name)
        if self.output_weight.shape[0] != self.vocab_size:
            raise ValueError(
                f"VLLMHiddenStateTeacher: the output layer has {self.output_weight.shape[0]} rows but the model's "
                f"vocabulary {self.vocab_size}; point `model` at the directory vLLM serves."
            )

    @torch.no_grad()
    def score_completions(self, request: ScoreRequest) -> TeacherScores:
        """vLLM returns each sequence's hidden states; the output layer turns the completion positions into logits."""
        sequences, prompt_lengths = request.sequences, request.prompt_lengths
        completion_lengths = request.completion_lengths
        as_hidden, out = self.completion_writer(request)
        hidden_rows = {}
        todo = [i for i, clen in enumerate(completion_lengths) if clen > 0]
        if not todo:
            return out.result()
        prompts = [self._tokens_prompt(prompt_token_ids=[int(t) for t in sequences[i]]) for i in todo]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        for i, output in zip(todo, outputs):
            hidden = output.outputs.data
            plen, clen = prompt_lengths[i], completion_lengths[i]
            if hidden.shape[0] != len(sequences[i]):
                raise RuntimeError(
                    f"VLLMHiddenStateTeacher: vLLM returned {hidden.shape[0]} hidden states for a {len(sequences[i])}"
                    "-token sequence; start the engine with tok_pooling_type='ALL' (one state per position)."
                )
            # position p predicts token p + 1: completion token j comes from position plen - 1 + j
            rows_hidden = hidden[plen - 1 : plen - 1 + clen].float()
            if as_hidden:
                hidden_rows[i] = rows_hidden
            logits = rows_hidden @ self.output_weight.T
            targets = torch.tensor([int(t) for t in sequences[i][plen:]], dtype=torch.long)
            out.add(i, torch.log_softmax(logits / self.temperature, dim=-1), targets)
        scores = out.result()
        if as_hidden:
            width = max(completion_lengths)
            stacked = torch.zeros(len(sequences), width, self.output_weight.shape[1])
            for i, rows_hidden in hidden_rows.items():
                stacked[i, : rows_hidden.shape[0]] = rows_hidden.cpu()
            scores.full_hidden = HiddenStateLogprobs(stacked, self.output_weight, scores.mask, self.temperature)
        return scores
