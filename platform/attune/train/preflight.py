"""What the driver checks before any cluster work: the model, LoRA's targets, the memory plan
(where the recipe gives the device memory), the data, the chat template. A run that would fail
in its workers after a minute fails here, in one line (the memory plan's table after it).

    checked = check_recipe(recipe)     # ConfigError or DataError naming the key or file:line
    check_memory(recipe, *capacity.device_memory(recipe))   # once Ray is up: the cluster's devices
"""

from __future__ import annotations

from dataclasses import dataclass

from attune import modeling
from attune.config import ConfigError
from attune.recipe import Recipe
from attune.train import memory_plan, methods
from attune.train.records import Record, read_records, split_eval
from attune.train.tokenizing import tokenize


@dataclass
class CheckedRecipe:
    base_path: str  # the base model's directory (or hub id)
    train_records: list[Record]
    eval_records: list[Record]


def check_recipe(recipe: Recipe) -> CheckedRecipe:
    base_path = modeling.resolve(recipe.model.name_or_path)
    config = modeling.model_config(recipe.model.name_or_path)
    if recipe.method.type == "lora":
        _check_lora_targets(recipe.method.target_modules, modeling.module_names(config))
    if recipe.scaling.device_memory_gib is not None:
        check_memory(recipe, recipe.scaling.device_memory_gib, "scaling.device_memory_gib")
    d = recipe.data
    records = read_records(d.train_files, d.format)
    if d.eval_files:
        train_records, eval_records = records, read_records(d.eval_files, d.format)
    else:
        train_records, eval_records = split_eval(records, d.eval_fraction, recipe.optim.seed)
    _check_template(recipe, base_path, train_records[0])
    methods.get(recipe.method.objective).check(recipe, train_records + eval_records)
    return CheckedRecipe(base_path, train_records, eval_records)


def check_memory(recipe: Recipe, device_memory_gib: float | None, source: str) -> memory_plan.Plan:
    """Refuse a run whose memory plan exceeds its workers' devices, with the plan's table and
    the changes that fit; a device of unknown memory is said, not refused."""
    plan = memory_plan.plan_recipe(recipe, device_memory_gib=device_memory_gib,
                                   device_source=source)
    if plan.fits is None:
        print(f"[attune] memory plan {memory_plan.size(plan.total_bytes)} a worker, not "
              f"checked: {source}", flush=True)
    elif not plan.fits:
        raise ConfigError(
            f"memory plan: {memory_plan.size(plan.total_bytes)} a worker's device, over the "
            f"{memory_plan.size(plan.device_bytes)} usable of {device_memory_gib:g} GiB ({source}){'' if plan.suggestions else '; no single change found fits'}\n"
            + memory_plan.format_plan(plan, recipe))
    return plan


def _check_lora_targets(targets: list[str], modules: set[str]) -> None:
    missing = [t for t in targets if t not in modules]
    if missing:
        linear = sorted(m for m in modules if m.endswith("_proj"))
        raise ConfigError(f"method.target_modules: the model has no {', '.join(missing)} "
                          f"(its projections: {', '.join(linear) or 'none'})")


def _check_template(recipe: Recipe, base_path: str, record: Record) -> None:
    try:
        # loading renders the template too (to find its end of turn)
        tokenizer = modeling.load_tokenizer(base_path, recipe.data.chat_template)
        tokenize(record, tokenizer, recipe.data.max_seq_len)
    except ConfigError:  # a template attune refuses says why itself
        raise
    except Exception as e:  # jinja's errors and the tokenizer's: any of them stops every worker
        key = "data.chat_template" if recipe.data.chat_template else "the tokenizer's chat template"
        raise ConfigError(f"{key}: does not render {record.source}: "
                          f"{type(e).__name__}: {e}") from None
