"""Make the subspace-locked tuner a first-class PEFT method.

:mod:`lockedopd.adapter.peft_type` adds ``SUBSPACE_LOCKED`` to ``peft.PeftType``; here the config and model classes
are registered with ``peft.utils.register_peft_method``. After ``import lockedopd.adapter``, ``get_peft_model``,
``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` work with this method in any process.
"""

from __future__ import annotations

from .config import SubspaceLockedConfig
from .model import SubspaceLockedModel
from .peft_type import METHOD_NAME, PEFT_TYPE_SUBSPACE_LOCKED, PREFIX, extend_enum

__all__ = ["METHOD_NAME", "PEFT_TYPE_SUBSPACE_LOCKED", "PREFIX", "extend_enum", "register_subspace_locked"]


def register_subspace_locked() -> None:
    """Register ``SubspaceLockedConfig``/``SubspaceLockedModel`` with PEFT under ``"subspace_locked"``.

    Idempotent: calling it again is a no-op; if the classes were re-created (e.g. ``importlib.reload``) the PEFT
    mappings are pointed at the new classes.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = PEFT_TYPE_SUBSPACE_LOCKED
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING or peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SubspaceLockedConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SubspaceLockedModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
        return
    register_peft_method(
        name=METHOD_NAME, config_cls=SubspaceLockedConfig, model_cls=SubspaceLockedModel, prefix=PREFIX
    )
