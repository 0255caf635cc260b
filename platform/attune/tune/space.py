"""Search dimensions: `loguniform(1e-5, 1e-2)` and friends, parsed and checked against a recipe.

    dim = parse_dimension("optim.lr", "loguniform(1e-5, 1e-2)")
    check_dimension(dim, recipe_raw)     # ConfigError naming the key if the range cannot run
    dim.domain()                         # the ray.tune sampler for it

A dimension is checked before any trial starts: its key must be a recipe key, its range must
hold at least two values, and the recipe must validate at the range's ends (so
`optim.warmup_steps: randint(0, 50)` fails at once when optim.max_steps is 40).
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from typing import Any

from ray import tune

from attune.config import ConfigError, apply_override, validate
from attune.recipe import Recipe

# name -> number of numeric bounds; `choice` takes one list instead.
_RANGES = {"uniform": 2, "loguniform": 2, "randint": 2, "lograndint": 2, "quniform": 3}
_LISTS = ("choice", "grid")
_FORMS = ("uniform(a, b), loguniform(a, b), quniform(a, b, q), randint(a, b), lograndint(a, b), "
          "choice([...]), grid([...]) (every value, num_samples times)")


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted recipe path, e.g. optim.lr
    kind: str  # one of _RANGES or _LISTS
    args: tuple

    def domain(self):
        if self.kind == "choice":
            return tune.choice(list(self.args[0]))
        if self.kind == "grid":
            return tune.grid_search(list(self.args[0]))
        return getattr(tune, self.kind)(*self.args)

    def edges(self) -> list:
        """The values whose validity stands for the whole range (randint excludes its upper bound)."""
        if self.kind in _LISTS:
            return list(self.args[0])
        low, high = self.args[0], self.args[1]
        return [low, high - 1] if self.kind in ("randint", "lograndint") else [low, high]


def parse_dimension(key: str, text: str) -> Dimension:
    match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", str(text), flags=re.S)
    if not match:
        raise ConfigError(f"space.{key}: {text!r} is not a range; use one of {_FORMS}")
    kind, body = match.groups()
    try:
        args = ast.literal_eval(f"({body},)") if body.strip() else ()
    except (ValueError, SyntaxError):
        raise ConfigError(f"space.{key}: cannot read the arguments of {text!r}") from None
    if kind in _LISTS:
        if len(args) != 1 or not isinstance(args[0], (list, tuple)):
            raise ConfigError(f"space.{key}: {kind} takes one list, e.g. {kind}([4, 8, 16])")
        if len(args[0]) < 2:
            raise ConfigError(f"space.{key}: {kind}({list(args[0])}) offers fewer than two values")
        return Dimension(key, kind, (tuple(args[0]),))
    if kind not in _RANGES:
        raise ConfigError(f"space.{key}: unknown range {kind!r}; use one of {_FORMS}")
    if len(args) != _RANGES[kind] or not all(isinstance(a, (int, float)) for a in args):
        raise ConfigError(f"space.{key}: {kind} takes {_RANGES[kind]} numbers, got {text!r}")
    _check_bounds(key, kind, args)
    return Dimension(key, kind, tuple(args))


def _check_bounds(key: str, kind: str, args: tuple) -> None:
    low, high = args[0], args[1]
    if kind in ("randint", "lograndint") and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"space.{key}: {kind} bounds must be integers, got {low!r}, {high!r}")
    if not low < high:
        raise ConfigError(f"space.{key}: {kind}({low}, {high}) is an empty range (low must be "
                          "below high)")
    if kind in ("randint", "lograndint") and high - low < 2:
        raise ConfigError(f"space.{key}: {kind}({low}, {high}) holds one value (the upper bound "
                          "is excluded)")
    if kind.startswith("log") and low <= 0:
        raise ConfigError(f"space.{key}: {kind} needs a positive lower bound, got {low}")
    if kind == "quniform" and not 0 < args[2] <= high - low:
        raise ConfigError(f"space.{key}: quniform step {args[2]} does not fit in [{low}, {high}]")


def check_dimension(dim: Dimension, recipe_raw: dict) -> None:
    """The key exists in the recipe and the recipe validates at each end of the range."""
    try:
        apply_override(copy.deepcopy(recipe_raw), f"{dim.key}=0", Recipe)  # checks the key only
    except ConfigError as e:
        raise ConfigError(f"space.{e} (search keys are recipe keys)") from None
    for value in dim.edges():
        raw = copy.deepcopy(recipe_raw)
        set_path(raw, dim.key, value)
        try:
            validate(Recipe, raw, source=f"space.{dim.key}={value!r}")
        except ConfigError as e:
            raise ConfigError(f"{e} (the range {dim.kind}{_show(dim.args)} reaches values the "
                              "recipe rejects)") from None


def set_path(raw: dict, key: str, value: Any) -> None:
    """Put `value` at a dotted key of a raw recipe mapping (the key is already checked)."""
    *sections, last = key.split(".")
    node = raw
    for part in sections:
        node = node.setdefault(part, {})
    node[last] = value


def _show(args: tuple) -> str:
    return "(" + ", ".join(repr(list(a)) if isinstance(a, tuple) else repr(a) for a in args) + ")"
