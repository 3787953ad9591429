"""GaLore (``galore-torch``) as a whole-run baseline optimizer, with a state dict that holds only tensors.

``galore_torch``'s AdamW keeps a ``GaLoreProjector`` object per matrix in its state; checkpoints here are read with
``torch.load(weights_only=True)`` (nothing untrusted is unpickled), so :class:`CheckpointableGaLore` stores each
projector's orthogonal matrix as a tensor and rebuilds the projector on load.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterable
from functools import cache

import torch

__all__ = ["build_galore_adamw", "load_galore_adamw"]

GALORE_PROJ_TYPES = ("std", "reverse_std", "left", "right")


@cache
def load_galore_adamw():
    """``(GaLoreAdamW class, None)`` or ``(None, reason)`` (looked up once per process).

    ``galore_torch/__init__`` also imports its 8-bit optimizer, which needs bitsandbytes; without it only the AdamW
    module (and its projector) is loaded, from the installed package.
    """
    try:
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW, None
    except ImportError:
        pass
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        return None, "galore-torch is not installed (pip install --no-deps galore-torch)"
    for name in [n for n in sys.modules if n == "galore_torch" or n.startswith("galore_torch.")]:
        del sys.modules[name]
    package = types.ModuleType("galore_torch")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["galore_torch"] = package
    try:
        return importlib.import_module("galore_torch.adamw").AdamW, None
    except Exception as exc:  # noqa: BLE001 - any failure means "GaLore is not available here"
        return None, f"galore-torch does not import: {type(exc).__name__}: {exc}"


@cache
def _checkpointable_class() -> type:
    base, reason = load_galore_adamw()
    if base is None:
        raise ImportError(f"optimizer=galore needs galore-torch: {reason}; `make install` adds it.")
    projector_cls = importlib.import_module("galore_torch.galore_projector").GaLoreProjector

    class CheckpointableGaLore(base):
        """galore-torch's AdamW whose ``state_dict`` holds tensors only (projector → ``galore_ortho`` tensor)."""

        def state_dict(self) -> dict:
            """As torch's, with every ``projector`` replaced by its orthogonal matrix."""
            out = super().state_dict()
            state = {}
            for key, value in out["state"].items():
                value = dict(value)
                projector = value.pop("projector", None)
                if projector is not None and projector.ortho_matrix is not None:
                    value["galore_ortho"] = projector.ortho_matrix.detach().clone()
                state[key] = value
            return {**out, "state": state}

        def load_state_dict(self, state_dict: dict) -> None:
            """As torch's; projectors are rebuilt from the group settings and the saved orthogonal matrices."""
            state_dict = {**state_dict, "state": {k: dict(v) for k, v in state_dict["state"].items()}}
            orthos = {k: v.pop("galore_ortho") for k, v in state_dict["state"].items() if "galore_ortho" in v}
            super().load_state_dict(state_dict)
            ids = [i for group in state_dict["param_groups"] for i in group["params"]]
            params = [p for group in self.param_groups for p in group["params"]]
            for saved_id, param in zip(ids, params):
                if saved_id not in orthos:
                    continue
                group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
                projector = projector_cls(
                    group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                    proj_type=group["proj_type"],
                )  # fmt: skip
                projector.ortho_matrix = orthos[saved_id].to(param.device)
                self.state[param]["projector"] = projector

    return CheckpointableGaLore


def build_galore_adamw(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    rank: int,
    update_proj_gap: int = 10,
    scale: float = 1.0,
    proj_type: str = "std",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """GaLore's AdamW over ``params`` (2-D weights get a rank-``rank`` gradient projection, refreshed every
    ``update_proj_gap`` steps), with a tensors-only state dict."""
    if proj_type not in GALORE_PROJ_TYPES:
        raise ValueError(f"galore.proj_type={proj_type!r} is not one of {list(GALORE_PROJ_TYPES)}.")
    params = list(params)
    group = {
        "params": params,
        "rank": rank,
        "update_proj_gap": update_proj_gap,
        "scale": scale,
        "proj_type": proj_type,
    }
    cls = _checkpointable_class()
    return cls([group], lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, no_deprecation_warning=True)
