"""Configuration of the subspace-locked PEFT tuner."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..subspace.basis import LOCK_MODES
from .peft_type import PEFT_TYPE_SUBSPACE_LOCKED

__all__ = ["MODES", "SubspaceLockedConfig"]

MODES = LOCK_MODES
_BIAS_OPTIONS = ("none", "all", "locked_only")


@dataclass
class SubspaceLockedConfig(PeftConfig):
    """Configuration of a [`SubspaceLockedModel`]: train only coefficients inside a frozen update subspace.

    For each target ``nn.Linear`` with weight ``W`` (out x in) a frozen orthonormal basis ``U`` (out x r), ``V``
    (in x r) is read from ``basis_path``, and the update is restricted to

    * ``mode="right"``: ``ΔW = A Vᵀ`` with trainable ``A`` (out x r), i.e. updates whose rows lie in span(V);
    * ``mode="two_sided"``: ``ΔW = U C Vᵀ`` with trainable ``C`` (r x r).

    Args:
        r (`int`): Rank of the locked subspace; every basis entry must have exactly ``r`` columns.
        mode (`str`): ``"right"`` (trainable ``A``, frozen ``V``) or ``"two_sided"`` (trainable ``C``, frozen
            ``U`` and ``V``).
        target_modules (`Union[list[str], str]`): Module names (suffix match) or a regex (full match) of the
            ``nn.Linear`` modules to lock, as in LoRA. ``"all-linear"`` is accepted.
        exclude_modules (`Union[list[str], str]`): Module names or regex of modules to leave untouched.
        basis_path (`str`): Path of a ``basis.safetensors`` file (see ``lockedopd.subspace.basis_io``) keyed by the
            base model's module names. Required when creating a new adapter; not needed when loading a saved adapter
            with ``save_basis=True`` (the bases travel inside the adapter checkpoint).
        modules_to_save (`list[str]`): Extra modules to make fully trainable and save, as in LoRA.
        bias (`str`): ``"none"``, ``"all"`` or ``"locked_only"``: which biases to train and save.
        fan_in_fan_out (`bool`): Set when the target stores its weight as (in, out) (GPT-2 ``Conv1D``); the basis
            is always given in the (out, in) convention.
        init_scale (`float`): Standard deviation of the random initial coefficients. ``0.0`` (default) starts at
            zero so that the wrapped model equals the base model exactly; use a small positive value for tests.
        save_basis (`bool`): Store ``U``/``V`` as persistent buffers so that they are saved with the adapter and
            ``PeftModel.from_pretrained`` needs no basis file. Must agree across adapters of one model.
    """

    r: int = field(default=16, metadata={"help": "Rank r of the locked subspace; must equal the basis rank."})
    mode: str = field(
        default="right",
        metadata={
            "help": (
                "'right': ΔW = A·Vᵀ with trainable A (out x r) and frozen V; 'two_sided': ΔW = U·C·Vᵀ with trainable "
                "C (r x r) and frozen U, V."
            )
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "List of module names (suffix match) or a regex (full match) of the nn.Linear modules to lock, e.g. "
                "['q_proj', 'v_proj'] or '.*layers.*(q|v)_proj$'. 'all-linear' selects all linear layers except "
                "the output head."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "List of module names or a regex of modules to exclude from locking."},
    )
    basis_path: str | None = field(
        default=None,
        metadata={
            "help": (
                "Path of a basis.safetensors file with '{module}.U' (out x r) and '{module}.V' (in x r) entries keyed "
                "by the base model's module names. Required for a new adapter; optional when loading a saved adapter "
                "that was saved with save_basis=True."
            )
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules apart from the locked layers to set as trainable and save in the checkpoint."},
    )
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'locked_only'."})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True if the target layer stores its weight as (fan_in, fan_out), like GPT-2's Conv1D."},
    )
    init_scale: float = field(
        default=0.0,
        metadata={
            "help": (
                "Std of the random initial coefficients; 0.0 starts at zero so the wrapped model equals the base "
                "model exactly. Use a small positive value only for testing."
            )
        },
    )
    save_basis: bool = field(
        default=True,
        metadata={
            "help": (
                "Save the frozen U/V bases with the adapter (persistent buffers) so loading needs no basis file. Must "
                "be the same for all adapters of a model."
            )
        },
    )

    def __post_init__(self) -> None:
        """Validate the arguments and set ``peft_type``."""
        super().__post_init__()
        self.peft_type = PEFT_TYPE_SUBSPACE_LOCKED
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"SubspaceLockedConfig: r={self.r!r} is invalid; pass a positive integer, e.g. r=16.")
        if self.mode not in MODES:
            raise ValueError(f"SubspaceLockedConfig: mode={self.mode!r} is invalid; allowed values are {list(MODES)}.")
        if self.bias not in _BIAS_OPTIONS:
            raise ValueError(
                f"SubspaceLockedConfig: bias={self.bias!r} is invalid; allowed values are {list(_BIAS_OPTIONS)}."
            )
        if not isinstance(self.init_scale, (int, float)) or not self.init_scale >= 0.0:
            raise ValueError(
                f"SubspaceLockedConfig: init_scale={self.init_scale!r} is invalid; pass a float >= 0 (0.0 = start "
                "exactly at the base model)."
            )
        if self.basis_path is not None and not isinstance(self.basis_path, str):
            self.basis_path = str(self.basis_path)
        # runtime flag (not a dataclass field, never serialised): set by from_pretrained so that the tuner knows
        # the bases will come from the checkpoint's state dict
        self._loading_checkpoint = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load a saved config; marks it as loaded from a checkpoint (bases then come from the saved state dict).

        Args:
            pretrained_model_name_or_path: Directory (or Hub id) holding ``adapter_config.json``.
            subfolder: Optional subfolder inside it.
            **kwargs: Forwarded to ``PeftConfig.from_pretrained``.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, SubspaceLockedConfig):
            config._loading_checkpoint = True
        return config
