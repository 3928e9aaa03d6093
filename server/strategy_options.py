"""Strategy options given as ``KEY=VALUE`` text, typed by the strategy's own constructor.

``--strategy-arg server_momentum=0.9`` (or the Flower App's ``strategy-args``) reaches a Flower
strategy's ``__init__`` as a keyword argument. Each value is converted to the type that
parameter declares (its annotation, else its default's type): ``bool`` (true/false/1/0), ``int``,
``float`` (finite), ``str``, any of them optional (``none``). An unknown key, a parameter that
fedcoreml sets itself or that text cannot express, or a value that does not convert is refused
before any device is contacted, naming the strategy, the key, the value and the type expected.
Values already typed (a run's saved ``run.json``, Python callers) are checked the same way.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Collection
from typing import Any

from fedcoreml.ios_bridge.errors import FedCoreMLError

SIMPLE_TYPES = (bool, int, float, str)
BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}
TYPE_WORDS = {bool: "a bool (true/false/1/0)", int: "an int", float: "a float", str: "a string"}


class StrategyError(FedCoreMLError):
    """An unknown strategy, or options it does not take."""


def split_options(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs as text (``-`` in a key becomes ``_``), not yet typed."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StrategyError(f"strategy option {item!r} is not KEY=VALUE")
        options[key.strip().replace("-", "_")] = raw
    return options


class ConstructorOptions:
    """The constructor parameters of a strategy class that an option may set, with their types."""

    def __init__(self, cls: type, fixed: Collection[str] = ()) -> None:
        self.fixed = frozenset(fixed)
        self.types: dict[str, tuple[type, bool]] = {}  # name -> (type, None allowed)
        self.other: set[str] = set()  # parameters text cannot express (callables, objects)
        hints = typing.get_type_hints(cls.__init__)
        for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in self.fixed:
                continue
            simple = _simple_type(hints.get(name), param.default)
            if simple is None:
                self.other.add(name)
            else:
                self.types[name] = simple

    def __contains__(self, name: str) -> bool:
        return name in self.types or name in self.fixed or name in self.other


def typed_options(
    strategy: str, options: dict[str, Any], parameters: ConstructorOptions
) -> dict[str, Any]:
    """``options`` converted to the types of ``parameters``; StrategyError naming what is wrong."""
    typed = {}
    for key, value in options.items():
        if key in parameters.fixed:
            raise StrategyError(f"strategy {strategy}: {key} is set by fedcoreml, not an option")
        if key in parameters.other:
            raise StrategyError(f"strategy {strategy}: {key} cannot be given as KEY=VALUE")
        if key not in parameters.types:
            takes = ", ".join(sorted(parameters.types)) or "none"
            raise StrategyError(
                f"strategy {strategy}: unknown option {key!r} (options it takes: {takes})"
            )
        kind, optional = parameters.types[key]
        try:
            typed[key] = _convert(value, kind, optional)
        except ValueError:
            expected = TYPE_WORDS[kind] + (" or none" if optional else "")
            raise StrategyError(
                f"strategy {strategy}: {key} must be {expected}, got {value!r}"
            ) from None
    return typed


def _simple_type(hint: Any, default: Any) -> tuple[type, bool] | None:
    """(type, optional) for a bool/int/float/str parameter, else None."""
    if hint is None:
        return (type(default), False) if type(default) in SIMPLE_TYPES else None
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            return None
        hint = args[0]
    return (hint, optional) if hint in SIMPLE_TYPES else None


def _convert(value: Any, kind: type, optional: bool) -> Any:
    """``value`` (text, or already typed) as ``kind``; ValueError if it is not one."""
    text = value.strip() if isinstance(value, str) else None
    if optional and (value is None or (text is not None and text.lower() == "none")):
        return None
    if kind is str and isinstance(value, str):
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in BOOL_WORDS:
            return BOOL_WORDS[text.lower()]
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            return int(text)
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif text is not None:
            number = float(text)
        if number is not None and math.isfinite(number):
            return number
    raise ValueError(f"not {TYPE_WORDS[kind]}")
