"""What the driver checks before any cluster work: the model, LoRA's targets, the data, the
chat template. A run that would fail in its workers after a minute fails here, in one line.

    checked = check_recipe(recipe)     # ConfigError or DataError naming the key or file:line
"""

from __future__ import annotations

from dataclasses import dataclass

from attune import data, modeling
from attune.config import ConfigError
from attune.recipe import Recipe


@dataclass
class CheckedRecipe:
    base_path: str  # the base model's directory (or hub id)
    train_records: list[data.Record]
    eval_records: list[data.Record]


def check_recipe(recipe: Recipe) -> CheckedRecipe:
    base_path = modeling.resolve(recipe.model.name_or_path)
    config = modeling.model_config(recipe.model.name_or_path)
    if recipe.method.type == "lora":
        _check_lora_targets(recipe.method.target_modules, modeling.module_names(config))
    d = recipe.data
    records = data.read_records(d.train_files, d.format)
    if d.eval_files:
        train_records, eval_records = records, data.read_records(d.eval_files, d.format)
    else:
        train_records, eval_records = data.split_eval(records, d.eval_fraction, recipe.optim.seed)
    _check_template(recipe, base_path, train_records[0])
    return CheckedRecipe(base_path, train_records, eval_records)


def _check_lora_targets(targets: list[str], modules: set[str]) -> None:
    missing = [t for t in targets if t not in modules]
    if missing:
        linear = sorted(m for m in modules if m.endswith("_proj"))
        raise ConfigError(f"method.target_modules: the model has no {', '.join(missing)} "
                          f"(its projections: {', '.join(linear) or 'none'})")


def _check_template(recipe: Recipe, base_path: str, record: data.Record) -> None:
    tokenizer = modeling.load_tokenizer(base_path, recipe.data.chat_template)
    try:
        data.tokenize(record, tokenizer, recipe.data.max_seq_len)
    except Exception as e:  # jinja's errors and the tokenizer's: any of them stops every worker
        key = "data.chat_template" if recipe.data.chat_template else "the tokenizer's chat template"
        raise ConfigError(f"{key}: does not render {record.source}: "
                          f"{type(e).__name__}: {e}") from None
