"""Subspace-locked PEFT tuner: train only coefficients inside a frozen top-r update subspace.

Importing this package extends ``peft.PeftType`` with ``SUBSPACE_LOCKED`` and registers the method with PEFT, so
``peft.get_peft_model(model, SubspaceLockedConfig(...))`` and ``PeftModel.from_pretrained`` work.
"""

from .config import SubspaceLockedConfig
from .export import export_lora, export_merged
from .layer import SubspaceLockedLayer
from .model import SubspaceLockedModel
from .registration import register_subspace_locked

__all__ = ["SubspaceLockedConfig", "SubspaceLockedLayer", "SubspaceLockedModel", "export_lora", "export_merged"]

register_subspace_locked()
