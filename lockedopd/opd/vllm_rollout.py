"""Student rollouts on a vLLM engine, kept in step with the student that OPD trains.

The student is written once as a Hugging Face directory and loaded into an in-process ``vllm.LLM`` with LoRA
enabled. After every optimizer step the engine is brought up to date:

- full-parameter phases (warmup, unlocked): the trained weights are copied into vLLM's model (vLLM's in-place
  ``reload_weights`` through ``LLM.collective_rpc``: an in-memory copy in the same process, no files);
- the locked phase: the base weights are copied once at the lock, and after each step only the adapter travels,
  exported as a plain LoRA (:func:`lockedopd.export_lora`: ΔW = A·Vᵀ is exactly a rank-r LoRA) and activated as
  a new ``LoRARequest``. That is r·(in + out) numbers per matrix instead of in·out.

Each sync's wall time is returned (the trainer logs it as ``sync_s``). Sampling is seeded per request, so a
resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lockedopd.opd.rollout import Rollout, SamplingSettings, StudentSampler, rollout_from_completions
from lockedopd.runtime.vllm_runtime import import_vllm, start_llm

#: LoRA ranks vLLM accepts for ``max_lora_rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VLLMStudentSampler(StudentSampler):
    """Samples student completions with vLLM; :meth:`sync_weights` / :meth:`sync_adapter` keep it current.

    Args:
        student_config: the student's ``transformers`` config.
        state_dict: the weights vLLM starts from, under plain module names (a plain causal LM's state dict).
        tokenizer: the student's tokenizer (saved next to the weights for vLLM).
        work_dir: where the student directory and the exported adapters are written.
        lora_rank: the locked subspace's rank r (vLLM's ``max_lora_rank`` is the next rank it supports).
        max_model_len: longest prompt + completion; defaults to the student's context.
        dtype: dtype vLLM samples in.
        **engine_kwargs: passed to ``vllm.LLM``.
    """

    def __init__(
        self,
        student_config: Any,
        state_dict: dict[str, torch.Tensor],
        tokenizer: Any,
        work_dir: str | os.PathLike,
        lora_rank: int = 16,
        max_model_len: int | None = None,
        dtype: str = "float32",
        **engine_kwargs: Any,
    ) -> None:
        vllm = import_vllm(type(self).__name__)
        from vllm.lora.request import LoRARequest

        self._vllm, self._lora_request_cls = vllm, LoRARequest
        self.work_dir = Path(work_dir)
        model_dir = self.work_dir / "student"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        write_hf_directory(model_dir, student_config, state_dict, tokenizer)
        supported = [r for r in VLLM_LORA_RANKS if r >= lora_rank]
        if not supported:
            raise ValueError(f"VLLMStudentSampler: vLLM serves LoRA ranks up to 512, got lora_rank={lora_rank}.")
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": dtype,
            "enable_lora": True,
            "max_lora_rank": supported[0],
            "max_loras": 1,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = start_llm(type(self).__name__, **{**kwargs, **engine_kwargs})
        self.lora_request = None
        self.adapter_version = 0

    # ------------------------------------------------------------------------------------------- weight sync
    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> float:
        """Copy full (merged) weights into the engine and drop any adapter; returns the seconds it took."""
        started = time.perf_counter()
        weights = [(name, tensor.detach()) for name, tensor in state_dict.items()]
        # vLLM's in-place reload: checkpoint-format names (as the HF state dict has them), processed like a load
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.lora_request = None
        return time.perf_counter() - started

    def sync_adapter(self, peft_model: nn.Module, adapter_name: str = "default") -> float:
        """Export the locked adapter as a LoRA and sample with it from now on; returns the seconds it took.

        The engine's base weights must be the adapter's base (call :meth:`sync_weights` with them at the lock).
        """
        from lockedopd.adapter import export_lora

        started = time.perf_counter()
        self.adapter_version += 1
        path = self.work_dir / f"lora-{self.adapter_version:06d}"
        export_lora(peft_model, path, adapter_name)
        previous = self.lora_request
        self.lora_request = self._lora_request_cls(f"student-{self.adapter_version}", self.adapter_version, str(path))
        if previous is not None:  # vLLM has read the old adapter; keep only the current one on disk
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return time.perf_counter() - started

    # --------------------------------------------------------------------------------------------- sampling
    def sample(self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, seed: int | None) -> Rollout:
        """One completion per prompt (row i seeded with ``seed + i``), laid out like ``generate_rollout``."""
        params = [
            self._vllm.SamplingParams(
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=-1,
                seed=None if seed is None else seed + i,
                stop_token_ids=settings.stop_token_ids(),
                logprobs=0,
                detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        completions, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            completions.append(list(sample.token_ids))
            logprobs.append(_sampled_logprobs(sample))
        return rollout_from_completions(
            prompt_ids, completions, logprobs, settings.pad_token_id, settings.eos_token_id
        )


class RunSamplerSync:
    """A :class:`VLLMStudentSampler` that follows an :class:`lockedopd.OPDTrainer`'s student through its phases.

    Full-parameter phases copy all weights after every step; a phase whose model is an adapter over a frozen base
    (the lock; ``rollout.vllm_locked_sync=lora``) copies the base once, whenever it changes (a lock, a relock), and
    after that only the adapter, as a LoRA (``vllm_locked_sync=full``: the merged weights, every step).

    Args:
        trainer: the trainer whose (possibly resumed) student the engine starts from.
    """

    def __init__(self, trainer: Any) -> None:
        from lockedopd.lock.phases import ADAPTER_NAME

        self.adapter_name = ADAPTER_NAME
        c, dist = trainer.config, trainer.dist
        base = self._frozen_base(trainer)
        context = getattr(trainer.base_model.config, "max_position_embeddings", None)
        self.sampler = VLLMStudentSampler(
            trainer.base_model.config,
            base if base is not None else trainer.effective_state_dict(),
            trainer.tokenizer,
            trainer.run_dir / ("vllm_student" if not dist.enabled else f"vllm_student-rank{dist.rank}"),
            lora_rank=c.lock.rank,
            max_model_len=context,
        )
        self.base_key = trainer.lock.phase_key(trainer.phase)
        if base is not None:
            self.sampler.sync_adapter(trainer.model, self.adapter_name)

    @staticmethod
    def _frozen_base(trainer: Any) -> dict[str, torch.Tensor] | None:
        """The frozen base under the trainer's adapter, when the engine should hold it (else None)."""
        if not trainer.lock.owns_phase(trainer.phase) or trainer.config.rollout.vllm_locked_sync != "lora":
            return None
        return trainer.lock.frozen_base_state_dict()

    def sync(self, trainer: Any) -> float:
        """Bring the engine up to date after an optimizer step of ``trainer``; returns the seconds it took."""
        key = trainer.lock.phase_key(trainer.phase)
        if not trainer.lock.owns_phase(trainer.phase) or trainer.config.rollout.vllm_locked_sync == "full":
            self.base_key = key
            return self.sampler.sync_weights(trainer.effective_state_dict())
        seconds = 0.0
        if self.base_key != key:
            seconds += self.sampler.sync_weights(trainer.lock.frozen_base_state_dict())
            self.base_key = key
        return seconds + self.sampler.sync_adapter(trainer.model, self.adapter_name)


def write_hf_directory(path: Path, config: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any) -> None:
    """A loadable Hugging Face model directory from a config and a plain state dict (tied weights stored once)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {
        name: tensor.detach().cpu().contiguous().clone()
        for name, tensor in state_dict.items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)


def _sampled_logprobs(sample: Any) -> list[float]:
    """The sampled tokens' log-probs from a vLLM ``CompletionOutput`` (dict-per-position or flat layout)."""
    entries = sample.logprobs
    if entries is None:
        return [0.0] * len(sample.token_ids)
    if hasattr(entries, "start_indices"):  # FlatLogprobs
        by_position = []
        for pos, (start, end) in enumerate(zip(entries.start_indices, entries.end_indices)):
            token = sample.token_ids[pos]
            matches = [entries.logprobs[k] for k in range(start, end) if entries.token_ids[k] == token]
            by_position.append(matches[0] if matches else 0.0)
        return by_position
    return [float(pos[token].logprob) for pos, token in zip(entries, sample.token_ids)]
