"""A name → entry table for the places users extend (teacher backends, objectives).

Registering a name twice is an error unless asked for, and looking up a missing name raises a ``ValueError`` that
lists the registered names and says how to add one.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


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
