"""Completions for the accuracy evaluator from a vLLM engine (``lockedopd eval --backend vllm``).

The model is written once as a plain Hugging Face directory (or, for a model directory that needs no change, read
where it is) and loaded into an in-process ``vllm.LLM``. Sampling is seeded per row, so the same model scores the
same twice; vLLM's random streams are not transformers', so its sampled accuracy is not the HF backend's number to
the sample (greedy agrees wherever both pick the same argmax).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lockedopd.runtime.vllm_runtime import import_vllm, start_llm

__all__ = ["VLLMTextGenerator"]


class VLLMTextGenerator:
    """A :data:`lockedopd.opd.accuracy.TextGenerator` on a vLLM engine.

    Args:
        model: the causal LM to serve (written to a temporary directory); ``None`` with ``model_dir``.
        tokenizer: its tokenizer (decodes the completions; saved with the model).
        model_dir: a Hugging Face model directory vLLM loads as it is, instead of ``model``.
        max_model_len: longest prompt + completion (default: the model's context).
        dtype: the dtype vLLM generates in.
        **engine_kwargs: passed to ``vllm.LLM``.
    """

    def __init__(
        self,
        model: nn.Module | None,
        tokenizer: Any,
        model_dir: str | Path | None = None,
        max_model_len: int | None = None,
        dtype: str = "float32",
        **engine_kwargs: Any,
    ) -> None:
        if (model is None) == (model_dir is None):
            raise ValueError("VLLMTextGenerator: give exactly one of model and model_dir.")
        self._vllm = import_vllm(type(self).__name__)
        self.tokenizer = tokenizer
        self._scratch = None
        if model is not None:
            from lockedopd.opd.vllm_rollout import write_hf_directory

            self._scratch = tempfile.TemporaryDirectory(prefix="lockedopd-eval-")
            model_dir = Path(self._scratch.name) / "model"
            write_hf_directory(model_dir, model.config, model.state_dict(), tokenizer)
        kwargs: dict[str, Any] = {"model": str(model_dir), "dtype": dtype}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = start_llm(type(self).__name__, **{**kwargs, **engine_kwargs})

    def __call__(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None, temperature: float, max_new_tokens: int
    ) -> tuple[list[str], list[int]]:
        """Decoded completions (to the first EOS, which is not decoded) and their token counts, EOS included."""
        eos = self.tokenizer.eos_token_id
        params = [
            self._vllm.SamplingParams(
                max_tokens=max_new_tokens,
                temperature=0.0 if seeds is None else temperature,
                top_p=1.0,
                top_k=-1,
                seed=None if seeds is None else int(seeds[row]),
                stop_token_ids=[eos] if isinstance(eos, int) else list(eos),
                detokenize=False,
            )
            for row in range(len(prompts))
        ]
        requests = [self._vllm.TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = [list(out.outputs[0].token_ids) for out in outputs]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True), [len(r) for r in rows]

    def close(self) -> None:
        """Release the engine and remove the temporary model directory."""
        self.llm = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
