"""Typed configuration shared by the Python API and the CLI.

Each config is a dataclass; ``add_arguments`` turns its fields into command-line flags (the
field's ``help`` metadata is the flag's help) and ``from_arguments`` turns parsed flags back into
the dataclass, so a default lives in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help text for its CLI flag."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "") + f" (default: {default})"
        origin = typing.get_origin(typ)
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if typ is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                               default=default, help=help_)
        elif origin in (list, tuple):
            group.add_argument(_flag(f.name), nargs="+", type=args[0] if args else str,
                               default=default, help=help_)
        else:
            base = args[0] if origin is typing.Union and args else typ
            choices = f.metadata.get("choices")
            group.add_argument(_flag(f.name), type=base, default=default, choices=choices,
                               help=help_)


def from_arguments(cls: type[T], ns: argparse.Namespace, **overrides) -> T:
    values = {}
    for f in dataclasses.fields(cls):
        if f.init and hasattr(ns, f.name):
            v = getattr(ns, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) and isinstance(f.default, tuple) else v
    values.update(overrides)
    return cls(**values)
