"""Verifiable rewards for reinforcement learning: Python callables a recipe names, each scoring a
completion with a float.

    rewards = load_rewards([RewardConfig(function="contains_answer", args={"field": "answer"}),
                            RewardConfig(function="my_rewards:brevity", weight=0.5)])
    scores = score(rewards, prompt, completion, fields={"answer": "12"}, source="qa.jsonl:3")

A reward is called as `function(prompt, completion, **fields, **args)`: `prompt` the prompt's
text (its last user turn for a chat), `completion` the model's text, `fields` the data line's
other fields (e.g. `answer`), `args` the recipe's keyword arguments for it. The built-ins are
below; a user's own function is `module:function`, importable where the training runs (a
job's working directory or an installed package travels to Ray's workers). A reward that raises
or returns something that is not a finite number stops the run with one line naming the
function and the example.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import Field

from attune.config import ConfigError, StrictConfig


class RewardError(RuntimeError):
    """A reward that raised or returned a non-number: one line, the function and the example."""


class RewardConfig(StrictConfig):
    function: str = Field(description="A built-in reward (contains_answer, exact_match, "
                          "numeric_match, matches_format, length_penalty) or your own as "
                          "'module:function', called as function(prompt, completion, **fields, "
                          "**args) -> float.")
    weight: float = Field(1.0, description="Its weight in the summed reward.")
    args: dict = Field(default_factory=dict, description="Keyword arguments for the function, "
                       "e.g. {field: answer} or {pattern: '^[A-Z].*\\.$'}.")


def contains_answer(prompt: str, completion: str, field: str = "answer", **fields) -> float:
    """1 if the data line's `field` appears in the completion (case and spacing ignored), else 0."""
    return float(_normal(str(fields[field])) in _normal(completion))


def exact_match(prompt: str, completion: str, field: str = "answer", **fields) -> float:
    """1 if the completion is the data line's `field` (case and outer spacing ignored), else 0."""
    return float(_normal(completion) == _normal(str(fields[field])))


def numeric_match(prompt: str, completion: str, field: str = "answer", tolerance: float = 1e-6,
                  **fields) -> float:
    """1 if the completion's last number equals the data line's `field` within `tolerance`."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    return float(bool(numbers) and abs(float(numbers[-1]) - float(fields[field])) <= tolerance)


def matches_format(prompt: str, completion: str, pattern: str = r".+", **fields) -> float:
    """1 if the whole completion matches the regular expression `pattern`, else 0."""
    return float(re.fullmatch(pattern, completion.strip(), flags=re.DOTALL) is not None)


def length_penalty(prompt: str, completion: str, max_chars: int = 200, **fields) -> float:
    """0 up to `max_chars` characters, then minus the share by which the completion is longer."""
    return -max(0, len(completion) - max_chars) / max_chars


BUILT_IN = {f.__name__: f for f in (contains_answer, exact_match, numeric_match, matches_format,
                                    length_penalty)}


@dataclass(frozen=True)
class Reward:
    name: str  # as the recipe gives it: a built-in's name or module:function
    function: Callable[..., float]
    weight: float
    args: dict


def load_rewards(configs: list[RewardConfig], key: str = "method.rewards") -> list[Reward]:
    """Each reward's function, imported; what cannot be imported or called is a ConfigError
    naming its place in the recipe."""
    return [Reward(c.function, _function(c.function, f"{key}[{i}].function"), c.weight, c.args)
            for i, c in enumerate(configs)]


def _function(name: str, key: str) -> Callable[..., float]:
    if name in BUILT_IN:
        return BUILT_IN[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{key}: '{name}' is neither a built-in reward ({', '.join(BUILT_IN)}) "
                          "nor module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import {module_name} ({e}); it must be importable where "
                          "training runs (the job's working directory or an installed package)") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{key}: {module_name} has no function {attribute}")
    try:
        inspect.signature(function).bind("prompt", "completion")
    except TypeError:
        raise ConfigError(f"{key}: {name} must take (prompt, completion, **fields)") from None
    return function


def score(rewards: list[Reward], prompt: str, completion: str, fields: dict, source: str) -> list[float]:
    """Each reward's value for one completion; a raise or a non-number is a RewardError."""
    values = []
    for reward in rewards:
        try:
            value = reward.function(prompt, completion, **fields, **reward.args)
        except Exception as e:
            raise RewardError(f"reward {reward.name} on {source}: raised {type(e).__name__}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardError(f"reward {reward.name} on {source}: returned {value!r}, not a finite number")
        values.append(float(value))
    return values


def _normal(text: str) -> str:
    return " ".join(text.lower().split())
