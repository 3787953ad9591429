"""A name → entry table for the places users extend (teacher backends, objectives, optimizers, lock methods).

Registering a name twice is an error unless asked for, and looking up a missing name raises a ``ValueError`` that
lists the registered names and says how to add one. The config names a registry by the setting it serves
(:func:`registry_for`), so it declares its choices without importing the modules that implement them.
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

T = TypeVar("T")

# The module that defines (and fills) the registry of each setting the config takes from a registry; imported on
# first use, so reading a config imports no runtime.
REGISTRY_HOMES = {
    "teacher.backend": "lockedopd.teachers.registry",
    "objective.name": "lockedopd.opd.objective_registry",
    "optimizer": "lockedopd.optim.full",
}
_BY_SETTING: dict[str, Registry] = {}


def registry_for(setting: str) -> Registry:
    """The registry whose names are the values of config setting ``setting`` (e.g. ``"teacher.backend"``)."""
    if setting not in _BY_SETTING and setting in REGISTRY_HOMES:
        importlib.import_module(REGISTRY_HOMES[setting])
    if setting not in _BY_SETTING:
        raise ValueError(f"no registry serves the setting {setting!r}; known: {sorted(REGISTRY_HOMES)}.")
    return _BY_SETTING[setting]


def registered_choices(setting: str):
    """A function returning the values ``setting`` accepts (its registry's names), for a config ``choice``."""

    def choices() -> tuple[str, ...]:
        return registry_for(setting).choices()

    choices.__doc__ = f"The values {setting} accepts: its registry's names."
    return choices


class Registry(dict, Generic[T]):
    """Entries by name (a ``dict``), with checked registration and lookup.

    Args:
        setting: the config key whose values the names are (named in errors), e.g. ``"teacher.backend"``.
        how_to_add: the sentence in lookup errors that says how to register a new entry.
        extra_choices: values the setting also accepts that are not entries (e.g. ``"auto"``).
    """

    def __init__(self, setting: str, how_to_add: str, extra_choices: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.setting = setting
        self.how_to_add = how_to_add
        self.extra_choices = extra_choices
        _BY_SETTING.setdefault(setting, self)

    def register(self, name: str, entry: T, replace: bool = False) -> None:
        """Add ``entry`` as ``name`` (see :meth:`check_new`)."""
        self.check_new(name, replace)
        self[name] = entry

    def check_new(self, name: str, replace: bool = False) -> None:
        """Raise ``ValueError`` if ``name`` is reserved, empty, or taken (unless ``replace``)."""
        if not name or name in self.extra_choices:
            raise ValueError(f"{self.setting}: {name!r} is reserved; register the entry under another name.")
        if name in self and not replace:
            raise ValueError(
                f"{self.setting}: {name!r} is already registered; pick another name or pass replace=True."
            )

    def lookup(self, name: str) -> T:
        """The entry registered as ``name``; a ``ValueError`` naming the accepted values otherwise."""
        if name not in self:
            raise ValueError(f"{self.setting}={name!r} is not one of {list(self.choices())}; {self.how_to_add}.")
        return self[name]

    def choices(self) -> tuple[str, ...]:
        """The values the setting accepts: the registered names, then the extra choices."""
        return (*self, *self.extra_choices)
