"""Training methods: what makes SFT, DPO and GRPO what they are, one module each.

    method = methods.get(recipe.method.objective)
    method.formats                              # the data.format values it trains on
    rows = method.rows(records, tokenizer, max_seq_len, packing)     # in Ray Data's tasks
    method.reference(recipe)                    # None, FROZEN_COPY or ADAPTERS_OFF
    objective = method.objective(recipe, model, reference)            # what the loop minimises
    method.memory_terms(shape, recipe, sizes)   # its terms in the memory plan
    method.engines(recipe)                      # rollout engines it samples from (GRPO), or None
    online = method.online(recipe, rollouts)    # then: its step around the loop's

The recipe, the data pipeline, the loop and the memory plan ask the method; none of them tests
for a method's name. A method's own fields sit under `method:` beside `objective` and are
validated with the recipe (its `Options`). Adding one: a module here with a `Method` subclass and
its line in `_BUILT_IN`, or `register(MyMethod())` from any code that runs before the recipe is
read (docs/training.md, "Adding a method").
"""

from __future__ import annotations

from attune.train.methods.base import ADAPTERS_OFF, FROZEN_COPY, Method  # noqa: F401
from attune.train.methods.dpo import DPO
from attune.train.methods.grpo import GRPO
from attune.train.methods.sft import SFT

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make a method available to recipes as `method.objective: <its name>`."""
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown training method '{name}' (known: {', '.join(names())})")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def option_fields() -> dict[str, object]:
    """Every registered method's own fields, by name (for overrides and search spaces)."""
    return {k: f.annotation for m in _REGISTRY.values() for k, f in m.Options.model_fields.items()}


def owners(field: str) -> list[str]:
    """The methods that have `field` among their own."""
    return [m.name for m in _REGISTRY.values() if field in m.Options.model_fields]


for _method in (SFT(), DPO(), GRPO()):  # the built-in methods
    register(_method)
