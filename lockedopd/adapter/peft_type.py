"""The ``SUBSPACE_LOCKED`` member of PEFT's closed ``PeftType`` enum, added at import time (a leaf module).

PEFT keys everything on ``peft.PeftType``, so a new member is added to it idempotently, without ``aenum``;
:mod:`lockedopd.adapter.registration` then registers the config and model classes under it.
"""

from __future__ import annotations

import enum

from peft.utils.peft_types import PeftType

__all__ = ["METHOD_NAME", "PEFT_TYPE_SUBSPACE_LOCKED", "PREFIX", "extend_enum"]

METHOD_NAME = "subspace_locked"
PREFIX = "locked_"


def extend_enum(enum_cls: type[enum.Enum], name: str, value: object) -> enum.Enum:
    """Add member ``name = value`` to an existing (closed) enum class, or return it if already present.

    Works for plain and mixed-in enums (``class PeftType(str, Enum)``): the member is created with the mixed-in
    type's ``__new__`` exactly like the enum machinery does, then entered in ``_member_map_``,
    ``_value2member_map_`` and ``_member_names_`` and set as a class attribute, so attribute access,
    ``enum_cls(value)``, ``enum_cls[name]``, iteration, ``len`` and pickling all see it.

    Args:
        enum_cls: The enum class to extend.
        name: Member name, e.g. ``"SUBSPACE_LOCKED"``.
        value: Member value, e.g. ``"SUBSPACE_LOCKED"``.

    Returns:
        The (new or existing) member.

    Raises:
        ValueError: ``name`` exists with a different value, or ``value`` is taken by another member.
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise ValueError(
                f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}; "
                "choose another member name."
            )
        return existing
    try:
        other = enum_cls(value)
    except ValueError:
        other = None
    if other is not None:
        raise ValueError(
            f"Value {value!r} is already used by {enum_cls.__name__}.{other.name}; cannot add it again as {name!r}."
        )

    member_type = getattr(enum_cls, "_member_type_", object)
    if member_type is object:
        member = object.__new__(enum_cls)
    else:
        member = member_type.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    try:
        member.__init__(value)
    except TypeError:  # pragma: no cover - enums with custom __init__ signatures
        pass
    member._sort_order_ = len(enum_cls._member_names_)

    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13 sets the class attribute (or descriptor) itself
        enum_cls._add_member_(name, member)
    else:
        enum_cls._member_map_[name] = member
        type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_.setdefault(value, member)
    hashable_values = getattr(enum_cls, "_hashable_values_", None)
    if isinstance(hashable_values, list) and value not in hashable_values:
        hashable_values.append(value)
    if enum_cls.__members__.get(name) is not member:  # pragma: no cover - defensive: unknown enum internals
        raise RuntimeError(f"Failed to add member {name!r} to {enum_cls.__name__}.")
    return member


PEFT_TYPE_SUBSPACE_LOCKED = extend_enum(PeftType, METHOD_NAME.upper(), METHOD_NAME.upper())
