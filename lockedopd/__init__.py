"""lockedopd: memory-cheap on-policy distillation by training inside the locked top-r update subspace.

``import lockedopd`` registers the ``SUBSPACE_LOCKED`` PEFT method, so ``peft.get_peft_model(model,
lockedopd.SubspaceLockedConfig(...))`` and ``PeftModel.from_pretrained(...)`` work.
"""

from lockedopd.runtime import quiet_imports  # noqa: F401, I001  (first: before peft imports bitsandbytes)
from lockedopd import teachers
from lockedopd.adapter import SubspaceLockedConfig, SubspaceLockedLayer, SubspaceLockedModel, export_lora
from lockedopd.diagnostics.monitor import TrajectoryMonitor
from lockedopd.integrations import SubspaceLockCallback, locked_peft_config
from lockedopd.opd import OPDConfig, OPDTrainer, load_config
from lockedopd.optim import LockedAdamW
from lockedopd.subspace import (
    LockPolicy,
    SubspaceBasis,
    SubspaceTracker,
    TrackerSettings,
    load_basis,
    save_basis,
    subspace_similarity,
)

__version__ = "0.1.0"

__all__ = [
    "LockPolicy",
    "LockedAdamW",
    "OPDConfig",
    "OPDTrainer",
    "SubspaceLockedConfig",
    "SubspaceLockedLayer",
    "SubspaceLockedModel",
    "SubspaceBasis",
    "SubspaceLockCallback",
    "SubspaceTracker",
    "TrackerSettings",
    "TrajectoryMonitor",
    "export_lora",
    "load_basis",
    "load_config",
    "locked_peft_config",
    "save_basis",
    "subspace_similarity",
    "teachers",
]
