"""Load recipes: YAML (with ``include:``) plus ``key.sub=value`` overrides -> typed dataclasses.

Format: a YAML mapping of sections. A top-level ``include:`` (a path or a list of paths,
relative to the including file) names base recipes; they are merged first, in order, and
the including file's values win (mappings merge key by key, everything else replaces).
Command-line overrides (``model.num_layers=8``) are applied last, their values parsed as
YAML scalars.

All problems are collected and raised together as one :class:`ConfigError` whose lines
each name the key path, what was wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from megatron_grow.config.check import check_recipe
from megatron_grow.config.schema import Recipe, field_problem
from megatron_grow.errors import ConfigError


def read_yaml_with_includes(path: str, _seen: tuple = ()) -> dict:
    """Read one YAML file and merge the files it includes underneath it."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError([f"include cycle: {' -> '.join(_seen + (path,))}"])
    if not os.path.isfile(path):
        raise ConfigError([f"recipe file not found: {path}"])
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # a binary file, or another encoding: name the first bad byte
        raise ConfigError([f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason}); "
                           "recipes are UTF-8 YAML"], source=path) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], source=path) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(raw).__name__}"], path)
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
        merged = deep_merge(merged, read_yaml_with_includes(inc_path, _seen + (path,)))
    return deep_merge(merged, raw)


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Mappings merge key by key; any other value in ``override`` replaces the base value."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Apply ``section.key=value`` strings; values are YAML scalars (``null``, ``1e-3``, ``[1,2]``)."""
    out = dict(raw)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}' is not of the form key.sub=value")
            continue
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        patch: Any = value
        for key in reversed(keys):
            patch = {key: patch}
        out = deep_merge(out, patch)
    if problems:
        raise ConfigError(problems)
    return out


def load_recipe(path: str | None = None, overrides: Iterable[str] = (),
                raw: dict | None = None) -> Recipe:
    """Load a recipe file (or an already-read mapping), apply overrides, type-check and validate."""
    data = read_yaml_with_includes(path) if path is not None else dict(raw or {})
    data = apply_overrides(data, overrides)
    problems: list[str] = []
    recipe = build_dataclass(Recipe, data, "", problems)
    if not problems:
        problems.extend(check_recipe(recipe))
    if problems:
        raise ConfigError(problems, source=path)
    return recipe


def recipe_to_dict(recipe: Any) -> dict:
    """The inverse of loading: plain types only, suitable for YAML/JSON (saved with checkpoints)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(recipe)


# ---------------------------------------------------------------------------------------------
# Type checking against the dataclass annotations.

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return the converted value or record a problem."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, Mapping):  # Optional[Section]: report the section's own problems by key
            sections = [a for a in args if dataclasses.is_dataclass(a)]
            if len(sections) == 1:
                return _coerce(value, sections[0], path, problems)
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} ({value!r})")
        return None
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping of {tp.__name__} keys, got {type(value).__name__}")
            return None
        return build_dataclass(tp, value, path, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (tuple, list) or origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if isinstance(value, str):
            return (value,)
    elif tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif tp is Any:
        return value
    problems.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} ({value!r})")
    return None


def build_dataclass(cls, data: Mapping, prefix: str, problems: list[str]):
    """Build ``cls`` from ``data``: unknown keys, wrong types and out-of-range values are problems."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = f"section '{prefix}'" if prefix else "a recipe"
            problems.append(f"{path}: unknown key in {where}{hint} (valid: {', '.join(fields)})")
            continue
        before = len(problems)
        converted = _coerce(value, hints[key], path, problems)
        if len(problems) > before:
            continue
        problem = field_problem(converted, fields[key].metadata, path)
        if problem:
            problems.append(problem)
            continue
        kwargs[key] = converted
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all keys were checked above
        problems.append(f"{prefix or 'recipe'}: {e}")
        return None
