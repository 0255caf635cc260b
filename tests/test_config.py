"""Recipes: every recipe in the repo loads; bad ones fail with the key's dotted path."""

from pathlib import Path

import pytest

from attune.config import ConfigError
from attune.recipe import Recipe, load_recipe

RECIPES = sorted(Path("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_in_the_repo_loads(path):
    assert isinstance(load_recipe(path), Recipe)


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            if hasattr(field.annotation, "model_fields"):
                walk(field.annotation, f"{prefix}{name}.")
    walk(Recipe)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("name: x\noptim: {max_steps: 10, lrr: 1}\n", "optim.lrr: unknown key (did you mean 'lr'?)"),
    ("name: x\noptimizer: {}\n", "optimizer: unknown key (did you mean 'optim'?)"),
    ("name: x\noptim: {max_steps: ten}\n", "optim.max_steps:"),
    ("name: x\noptim: {max_steps: 10, warmup_steps: 20}\n", "optim.warmup_steps (20) must be below"),
    ("name: x\noptim: {}\n", "set optim.max_steps or optim.epochs"),
    ("name: x\noptim: {max_steps: 100}\nscaling: {strategy: zero3}\n", "scaling.strategy:"),
    ("name: x\noptim: {max_steps: 100}\nmodel: {dtype: bfloat16}\n", "model.dtype: bfloat16 training on CPU"),
    ("name: x\noptim: {max_steps: 100}\nmemory: {cpu_offload: true}\n",
     "memory.cpu_offload needs scaling.strategy: fsdp"),
    ("name: x\noptim: {max_steps: 100}\nmemory: {mixed_precision: true}\n"
     "model: {dtype: bfloat16}\nscaling: {gpus_per_worker: 1}\n",
     "memory.mixed_precision keeps fp32 master weights"),
    ("name: x\noptim: {max_steps: 100}\nmemory: {loss_chunk_tokens: 0}\n",
     "memory.loss_chunk_tokens:"),
    ("name: x\noptim: {max_steps: 100}\nmethod: {type: lora, rank: 0}\n", "method.rank:"),
    ("name: 'bad name!'\noptim: {max_steps: 100}\n", "name:"),
    ("- just\n- a list\n", "a recipe is a mapping"),
])
def test_bad_recipes_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text))
    assert message in str(e.value)


def test_overrides_apply_and_unknown_override_keys_fail(tmp_path):
    path = write(tmp_path, "name: x\noptim: {max_steps: 100}\n")
    recipe = load_recipe(path, ["optim.lr=3e-4", "method.target_modules=[q_proj, v_proj]",
                                "optim.max_grad_norm=null"])
    assert recipe.optim.lr == 3e-4
    assert recipe.method.target_modules == ["q_proj", "v_proj"]
    assert recipe.optim.max_grad_norm is None
    with pytest.raises(ConfigError, match=r"scaling.num_worker: unknown key \(did you mean 'num_workers'\?\)"):
        load_recipe(path, ["scaling.num_worker=4"])
    with pytest.raises(ConfigError, match="expected dotted key=value"):
        load_recipe(path, ["optim.lr"])


def test_cli_reports_a_bad_recipe_without_a_traceback(tmp_path, capsys):
    from attune.cli import main

    assert main(["train", str(write(tmp_path, "name: x\noptim: {max_steps: 1, lrr: 1}\n"))]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr: unknown key" in err and "Traceback" not in err


@pytest.mark.parametrize("settings, checkpointing, mixed", [
    ({}, False, False),  # CPU: neither
    ({"scaling": {"gpus_per_worker": 1}}, True, True),  # GPU full fine-tuning: both
    ({"scaling": {"gpus_per_worker": 1}, "method": {"type": "lora"}}, True, False),
    ({"scaling": {"gpus_per_worker": 1}, "model": {"dtype": "bfloat16"}}, True, False),
    ({"scaling": {"gpus_per_worker": 1}, "memory": {"activation_checkpointing": False}}, False, True),
])
def test_memory_defaults_follow_the_device_and_method(settings, checkpointing, mixed):
    recipe = Recipe.model_validate({"name": "x", "optim": {"max_steps": 100}, **settings})
    assert (recipe.activation_checkpointing, recipe.mixed_precision) == (checkpointing, mixed)
