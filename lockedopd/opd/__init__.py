"""On-policy distillation: config, rollout, objectives, the training loop."""

from lockedopd.opd.config import OPDConfig, load_config
from lockedopd.opd.trainer import OPDTrainer

__all__ = ["OPDConfig", "OPDTrainer", "load_config"]
