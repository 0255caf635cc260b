"""The shared config machinery: a strict pydantic base, one error type, YAML and overrides.

    raw = read_mapping("recipes/tiny-full.yaml", "recipe")
    apply_override(raw, "optim.lr=1e-3", Recipe)
    recipe = validate(Recipe, raw, source="recipes/tiny-full.yaml")

Every config of attune (recipe, search, serving, chat page, k8s overlay) is a StrictConfig, and
every way one can be wrong is a ConfigError whose message names the file and the dotted key.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


def attune_home() -> Path:
    """Where attune keeps built models, runs and the registry unless told otherwise."""
    return Path(os.environ.get("ATTUNE_HOME", "~/.attune")).expanduser()


class ConfigError(ValueError):
    """A config (or an override of it) that cannot be used; the message names the key."""


class StrictConfig(BaseModel):
    """A config section: unknown keys are errors, and so are invalid assignments."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_mapping(path: str | Path, what: str) -> dict:
    """A YAML file's top-level mapping; a missing file, bad YAML or a non-mapping is a ConfigError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of keys, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict, item: str, schema: type[BaseModel]) -> None:
    """Set `a.b.c=value` in a raw mapping; the value is parsed as YAML (`1e-3`, `[a, b]`, `null`)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. optim.lr=1e-3")
    parts = key.strip().split(".")
    _check_path(parts, schema)
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _check_path(parts: list[str], schema: type[BaseModel]) -> None:
    model: Any = schema
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            raise ConfigError(f"{'.'.join(parts)}: {'.'.join(parts[:i])} has no sub-keys")
        if hasattr(model, "extra_fields"):  # a section that takes more keys (a method's own)
            fields = {**fields, **model.extra_fields()}
        if part not in fields:
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1]), part, fields))
        model = getattr(fields[part], "annotation", fields[part])


def _unknown_key_message(path: str, key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
    return f"{path}: unknown key{hint}"


def validate(schema: type[BaseModel], raw: dict, source: str):
    """Validate `raw` against `schema`, turning pydantic's errors into one readable message."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err, schema) for err in e.errors())) from None


def validate_section(schema: type[BaseModel], raw: dict, path: str):
    """Validate a section's keys inside another config's validator: a ValueError whose message
    names each key under `path` (e.g. `method.beta`)."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ValueError("; ".join(_describe({**err, "loc": (path, *err["loc"])}, schema, root=path)
                                   for err in e.errors())) from None


def _describe(err: dict, schema: type[BaseModel], root: str | None = None) -> str:
    """One error in words; `root`: the first part of the path is a section `schema` itself is."""
    path = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent: Any = schema
        for p in err["loc"][1 if root else 0:-1]:
            parent = parent.model_fields[p].annotation if hasattr(parent, "model_fields") else parent
        known = getattr(parent, "model_fields", {})
        return _unknown_key_message(path, str(err["loc"][-1]), known)
    message = err["msg"].removeprefix("Value error, ")
    if not path or message.startswith(path + "."):  # a section's own validator named the key
        return message
    return f"{path}: {message} (got {err.get('input')!r})"
