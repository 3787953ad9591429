"""Integrations of lockedopd with other training libraries.

* :mod:`lockedopd.integrations.trl`: a ``transformers.TrainerCallback`` that watches the update subspace during a
  full-parameter warmup run of any HF/TRL ``Trainer`` and writes ``basis.safetensors``, plus
  :func:`~lockedopd.integrations.trl.locked_peft_config` for the locked second run.
"""

from .trl import SubspaceLockCallback, locked_peft_config

__all__ = ["SubspaceLockCallback", "locked_peft_config"]
