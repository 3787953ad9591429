"""lockedopd: memory-cheap on-policy distillation by training inside the locked top-r update subspace."""

__version__ = "0.1.0"
