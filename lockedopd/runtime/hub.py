"""Models named the way users name them: a Hugging Face hub id (``Qwen/Qwen3-0.6B``) becomes a local directory.

The directory is the snapshot in the user's Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``), downloaded once
where the hub can be reached; offline (``HF_HUB_OFFLINE=1``, or no network) the cached snapshot is used. Every
backend (transformers, vLLM) then loads the same directory, so a hub id works wherever a directory does.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["is_hub_id", "resolve_hub_model"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(source: str) -> bool:
    """Whether ``source`` reads as ``owner/name`` (and is not an existing local path)."""
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def resolve_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of hub model ``repo_id`` at ``revision`` (default branch when ``None``).

    Raises:
        FileNotFoundError: the model is not in the cache and the hub cannot be reached (or has no such model /
            revision); the message names the id, ``HF_HUB_OFFLINE`` and the local-directory alternative.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        offline = " (HF_HUB_OFFLINE=1 is set)" if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"model {repo_id!r}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot "
            f"give it{offline}: {type(exc).__name__}. Download it where there is network (`huggingface-cli download "
            f"{repo_id}`), or set the source to a local model directory."
        ) from exc
