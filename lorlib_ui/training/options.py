"""Options declared once: each command's settings are one frozen dataclass, its fields carrying their
help text and its `__post_init__` their checks (as peft's `LoraConfig` does). The same dataclass
makes the command line's flags (`add_options`, `from_namespace`) and reads a worker job's plain dict
(`from_mapping`: unknown keys and wrong types refused in one line).

A field is declared with `option(default, help)`; its type says how it is read:

| field type                 | command line                                  | job dict                      |
|----------------------------|-----------------------------------------------|-------------------------------|
| bool                       | --name (default False) or --no-name (True)    | true or false                 |
| int, float                 | a number                                      | a number (an integer for int) |
| str                        | text                                          | a string                      |
| tuple[str, ...]            | comma-separated names                         | a list of strings             |
| tuple[int, ...]            | comma-separated whole numbers                 | a list of integers            |
| str | tuple[str, ...]      | one of `sets` as is, else comma-separated     | a string or a list of strings |

`| None` adds None, the default of an option that is not given. A field without a default is a
required flag (or a positional argument, with `positional`). It lives in `training`, the lowest
room the commands' entry points share, so that training, analysis, the worker and the command
line all read it; it imports nothing but the standard library and the error type.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lorlib_ui.core.errors import LorlibError

NAMES = tuple[str, ...]
NUMBERS = tuple[int, ...]
_DESCRIBED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_DESCRIBED |= {NAMES: "a list of strings", NUMBERS: "a list of integers"}


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 (argparse's word)
    *,
    flags: tuple[str, ...] = (),
    choices: Iterable | None = None,
    metavar: str | None = None,
    positional: bool = False,
    sets: Iterable[str] = (),
    group: str | None = None,
    internal: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that is an option. `flags`: the command line's spellings (default
    --field-name); `sets`: names a `str | tuple[str, ...]` option keeps whole; `group`: options of
    one group exclude each other on the command line; `internal`: set by the program, neither a
    flag nor a job's key; `factory`: the default, computed when the class is made into flags."""
    metadata = {"help": help, "flags": tuple(flags), "choices": None if choices is None else tuple(choices)}
    metadata |= {"metavar": metavar, "positional": positional, "sets": tuple(sets), "group": group}
    metadata |= {"internal": internal}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def options_of(cls: type) -> list[dataclasses.Field]:
    """The fields of a dataclass that are options (not `internal`)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal", False)]


def _members(cls: type, f: dataclasses.Field) -> tuple[list, bool]:
    """The types an option's value may have (None aside), and whether None is one of them."""
    kind = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = list(typing.get_args(kind))
    else:
        members = [kind]
    optional = type(None) in members
    members = [m for m in members if m is not type(None)]
    if unknown := [m for m in members if m not in _DESCRIBED]:
        raise TypeError(f"{cls.__name__}.{f.name}: no reading of options of type {unknown[0]}")
    return members, optional


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# ---- the command line -------------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _numbers(flag: str) -> Callable[[str], tuple[int, ...]]:
    def read(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in _names(text))
        except ValueError:
            raise LorlibError(f"{flag} takes whole numbers separated by commas, got {text!r}") from None

    return read


def _name_or_names(sets: tuple[str, ...]) -> Callable[[str], str | tuple[str, ...]]:
    return lambda text: text if text in sets else _names(text)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """The flags (and positional arguments) of `cls`'s options, with their help, defaults and
    choices; `from_namespace(cls, parsed)` makes the dataclass from what they parse."""
    groups: dict[str, Any] = {}  # group name -> its mutually exclusive group
    for f in options_of(cls):
        meta, default = f.metadata, _default(f)
        members, _ = _members(cls, f)
        where = parser
        if meta["group"] is not None:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            where = groups[meta["group"]]
        described = {"help": meta["help"] or None}
        if meta["positional"]:
            many = {"nargs": "*" if default is not dataclasses.MISSING else "+"} if members == [NAMES] else {}
            where.add_argument(f.name, metavar=meta["metavar"], **many, **described)
            continue
        flag = "--" + f.name.replace("_", "-")
        if members == [bool]:
            if default:
                where.add_argument(
                    *(meta["flags"] or ("--no-" + flag[2:],)), dest=f.name, action="store_false", **described
                )
            else:
                where.add_argument(*(meta["flags"] or (flag,)), dest=f.name, action="store_true", **described)
            continue
        flags = meta["flags"] or (flag,)
        read = {int: int, float: float, str: None, NAMES: _names, NUMBERS: _numbers(flags[0])}
        if members == [str, NAMES]:
            kind = _name_or_names(meta["sets"])
        elif len(members) == 1:
            kind = read[members[0]]
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag reads a value of {' or '.join(map(str, members))}")
        where.add_argument(
            *flags,
            dest=f.name,
            type=kind,
            default=None if default is dataclasses.MISSING else default,
            required=default is dataclasses.MISSING,
            choices=meta["choices"],
            metavar=meta["metavar"] or (None if meta["choices"] else flags[0].lstrip("-").replace("-", "_").upper()),
            **described,
        )


def from_namespace(cls: type, namespace: argparse.Namespace):
    """The `cls` that parsed flags say (it checks itself)."""
    values = {}
    for f in options_of(cls):
        value = getattr(namespace, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


# ---- a job's plain dict -----------------------------------------------------------------------------


def _read(members: list, value: Any) -> tuple[bool, Any]:
    """(whether `value` has one of the types, the value as the dataclass holds it: lists as
    tuples, an integer as a float where a number is asked for)."""
    for kind in members:
        if kind in (NAMES, NUMBERS):
            if isinstance(value, list | tuple):
                items = [_read([typing.get_args(kind)[0]], item) for item in value]
                if all(ok for ok, _ in items):
                    return True, tuple(item for _, item in items)
        elif isinstance(value, bool):  # a bool is an int to Python, never to a job
            if kind is bool:
                return True, value
        elif (kind is int and isinstance(value, int)) or (kind is float and isinstance(value, int | float)):
            return True, kind(value)
        elif kind is str and isinstance(value, str):
            return True, value
    return False, None


def from_mapping(cls: type, mapping: Mapping, what: str, beside: tuple[type, ...] = ()):
    """The `cls` a job's options say (it checks itself). Keys that are options of the dataclasses
    `beside` (read from the same dict) are left to them; any other unknown key, a value of the
    wrong type or a missing required option is refused with one line naming it and `what`."""
    if not isinstance(mapping, Mapping):
        raise LorlibError(f"{what}: options must be a dict, got {type(mapping).__name__}")
    mine = {f.name: f for f in options_of(cls)}
    known = set(mine) | {f.name for other in beside for f in options_of(other)}
    for key in mapping:
        if key not in known:
            listed = ", ".join(sorted(known))
            raise LorlibError(f"{what}: unknown option {str(key)[:60]!r}; the options are {listed}")
    values = {}
    for name, f in mine.items():
        if name not in mapping:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise LorlibError(f"{what}: option {name!r} is required")
            continue
        value = mapping[name]
        members, optional = _members(cls, f)
        ok, read = (True, None) if value is None and optional else _read(members, value)
        if not ok:
            wanted = " or ".join(_DESCRIBED[m] for m in members)
            raise LorlibError(f"{what}: option {name!r} must be {wanted}, got {repr(value)[:60]}")
        values[name] = read
    return cls(**values)
