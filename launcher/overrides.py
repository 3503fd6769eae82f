"""Text <-> config: `key=value` overrides with dotted paths, JSON round trips and field docstrings.

The same parser serves `python recipe.py`, `torchrun`, `deepspeed` and `launcher run`, so an override
means the same thing however a recipe is started.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
import unicodedata
from functools import cache
from typing import Any, Literal

from launcher.config import CHOICES, choice_name
from launcher.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def split_override(arg: str) -> tuple[str, str]:
    if "=" not in arg or arg.startswith("="):
        raise ConfigError(f"'{arg}' is not a setting: write overrides as key=value, e.g. train.lr=1e-4")
    key, value = arg.split("=", 1)
    return key.strip(), value.strip()


CONTROL_NAMES = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", "\x1b": "an escape", "\x00": "a NUL"}


def control_characters(text: str) -> str:
    """Why `text` cannot go into a command line or a generated script (a line break ends a script's line, and what
    follows it runs), or empty: every control character is refused."""
    found = sorted({c for c in text if unicodedata.category(c) == "Cc"})
    if not found:
        return ""
    names = ", ".join(CONTROL_NAMES.get(c, f"the control character {c!r}") for c in found)
    return f"holds {names}, which no command line or batch script may carry: remove it"


def apply_overrides(cfg: Any, args: list[str]) -> Any:
    """Return a copy of `cfg` with every `key=value` in `args` applied; all problems reported at once."""
    cfg = copy.deepcopy(cfg)
    pairs = [split_override(a) for a in args]
    unsafe = [f"{split_override(a)[0]}={a.split('=', 1)[1]!r}: {why}" for a in args if (why := control_characters(a))]
    if unsafe:
        raise ConfigError(unsafe)
    given: dict[str, str] = {}
    twice = []
    for key, raw in pairs:
        if key in given:
            twice.append(f"{key} is given twice ({key}={given[key]} and {key}={raw}): keep the one you mean")
        given.setdefault(key, raw)
    if twice:
        raise ConfigError(twice)
    # A choice (strategy=zero3) replaces a whole sub-config, so it goes before refinements of it.
    pairs.sort(key=lambda kv: 0 if kv[0] in CHOICES else 1)
    problems = []
    for key, raw in pairs:
        try:
            _apply_one(cfg, key, raw)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def _apply_one(cfg: Any, key: str, raw: str) -> None:
    parts = key.split(".")
    target = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in _field_names(target):
            raise _unknown_key(cfg, key)
        target = getattr(target, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(target) or leaf not in _field_names(target):
        if len(parts) == 2 and parts[0] in CHOICES:
            current = choice_name(getattr(cfg, parts[0]))
            owners = [n for n, make in CHOICES[parts[0]].items() if leaf in _field_names(make())]
            if owners:
                raise ConfigError(
                    f"{key} applies to {parts[0]}={' or '.join(sorted(set(owners)))}, "
                    f"but {parts[0]} is {current}: set {parts[0]}={owners[0]} as well"
                )
        raise _unknown_key(cfg, key)
    if leaf in CHOICES and len(parts) == 1:
        options = CHOICES[leaf]
        if raw not in options:
            raise ConfigError(f"{key}={raw}: unknown {leaf}; choose one of {', '.join(options)}")
        setattr(target, leaf, options[raw]())
        return
    hint = _type_hints(type(target))[leaf]
    if dataclasses.is_dataclass(getattr(target, leaf)):
        raise ConfigError(f"{key} is a section, not a value: set one of its fields, e.g. {key}.<field>=...")
    setattr(target, leaf, parse_value(raw, hint, key))


def _unknown_key(cfg: Any, key: str) -> ConfigError:
    from launcher.config import field_paths

    paths = field_paths(cfg)
    close = difflib.get_close_matches(key, paths, n=3, cutoff=0.5)
    if not close:  # a misspelt last part under a right section: compare leaf names too
        leaf = key.rsplit(".", 1)[-1]
        close = [p for p in paths if difflib.get_close_matches(leaf, [p.rsplit(".", 1)[-1]], cutoff=0.75)][:3]
    hint = f"did you mean {' or '.join(close)}?" if close else "run the recipe with --help to list the settings"
    return ConfigError(f"unknown setting '{key}': {hint}")


def parse_value(raw: str, hint: Any, key: str) -> Any:
    """Parse `raw` as the annotated type `hint`; the error names the key and an example."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
        return parse_value(raw, hint, key)
    if origin is Literal:
        if raw not in args:
            raise ConfigError(f"{key}={raw}: choose one of {', '.join(map(str, args))}")
        return raw
    if origin is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if hint is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}={raw}: expected true or false")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw}: expected a whole number, e.g. {key}=8") from None
    if hint is float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw}: expected a number, e.g. {key}=1e-4") from None
        if not math.isfinite(value):  # nan and inf pass every comparison check a setting has, then train garbage
            raise ConfigError(f"{key}={raw}: expected a finite number, e.g. {key}=1e-4")
        return value
    return raw


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


# --------------------------------------------------------------------------- JSON round trip


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict; choice fields carry their `name` so `from_dict` can rebuild them."""
    out: dict[str, Any] = {}
    if _is_choice(cfg):
        out["name"] = choice_name(cfg)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def _is_choice(obj: Any) -> bool:
    return any(type(obj) in {type(make()) for make in options.values()} for options in CHOICES.values())


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config of type `cls` from `to_dict` output (defaults fill anything absent)."""
    cfg = cls()
    _fill(cfg, data)
    return cfg


def _fill(cfg: Any, data: dict[str, Any]) -> None:
    for f in dataclasses.fields(cfg):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name in CHOICES and isinstance(value, dict):
            choice = CHOICES[f.name][value["name"]]()
            _fill(choice, value)
            setattr(cfg, f.name, choice)
        elif dataclasses.is_dataclass(getattr(cfg, f.name)):
            _fill(getattr(cfg, f.name), value)
        else:
            setattr(cfg, f.name, value)


# --------------------------------------------------------------------------- field docstrings


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (read from the source, as torchtitan does)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted path, current value, docstring) for every setting, for --help and docs."""
    rows = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = prefix + f.name
        if dataclasses.is_dataclass(value):
            if f.name in CHOICES:
                rows.append((path, choice_name(value), docs.get(f.name, "")))
            rows += describe(value, path + ".")
        else:
            shown = ",".join(value) if isinstance(value, list) else str(value)
            rows.append((path, shown, docs.get(f.name, "")))
    return rows
