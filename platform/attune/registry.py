"""Registry entries: what training leaves behind and what serving reads.

An entry is a directory (local, or under an s3:// / gs:// URI through pyarrow) holding
- the model: full weights (`model.safetensors`, `config.json`) or a LoRA adapter that vLLM loads
  (`adapter_config.json`, `adapter_model.safetensors`; no `modules_to_save`, no resized vocab),
- the tokenizer with its chat template, whose end of turn is the tokenizer's eos_token and, for
  full weights, in `generation_config.json`'s eos_token_id list (where vLLM stops),
- `attune.json`: base model, method, LoRA settings, dataset hash, metrics, the recipe, timestamps,
- `loss_curve.png` (the reward curve for GRPO).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

from attune.chat_templates import end_of_turn_id
from attune.config import ConfigError
from attune.plots import plot_losses
from attune.recipe import Recipe
from attune.store import filesystem

MANIFEST = "attune.json"
# What a directory with a model in it holds: full weights' config, or a LoRA adapter's.
MODEL_FILES = ("config.json", "adapter_config.json")


def entry_location(recipe: Recipe) -> str:
    root = recipe.output.registry
    if "://" in root:
        return f"{root.rstrip('/')}/{recipe.entry_name}"
    return str(Path(root).expanduser().resolve() / recipe.entry_name)


def write_entry(recipe: Recipe, model_dir: Path, history: list[dict], *, base_path: str,
                tokenizer, data_hash: str, data_stats: dict, extra: dict | None = None) -> str:
    """Publish a trained model as the recipe's registry entry; returns its location.

    `model_dir` holds the weights or the adapter (save_pretrained), `history` the metrics of each
    report, `tokenizer` the one to serve it with (its chat template included).
    """
    location = entry_location(recipe)
    with tempfile.TemporaryDirectory(prefix="attune-entry-") as tmp:
        staging = Path(tmp) / recipe.entry_name
        shutil.copytree(model_dir, staging)
        tokenizer.save_pretrained(staging)
        _stop_at_end_of_turn(staging, tokenizer)
        if recipe.method.type == "lora":
            _point_adapter_at_base(staging, base_path)
        manifest = _manifest(recipe, base_path, history, data_hash, data_stats, extra or {})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        plot_losses(history, staging / "loss_curve.png", title=recipe.entry_name)
        _publish(staging, location)
    return location


def _stop_at_end_of_turn(entry: Path, tokenizer) -> None:
    """vLLM stops on generation_config.json's eos_token_id (every id of a list) besides the
    tokenizer's eos; the template's end of turn must be one of them, or an answer runs on to
    max_tokens. An adapter has none: vLLM serves it with its base model's."""
    path = entry / "generation_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    known = config.get("eos_token_id")
    known = [] if known is None else [known] if isinstance(known, int) else list(known)
    ends = [tokenizer.eos_token_id, end_of_turn_id(tokenizer), *known]
    config["eos_token_id"] = list(dict.fromkeys(i for i in ends if i is not None))
    path.write_text(json.dumps(config, indent=2) + "\n")


def _point_adapter_at_base(entry: Path, base_path: str) -> None:
    config_path = entry / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_path
    config["modules_to_save"] = None
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _manifest(recipe: Recipe, base_path: str, history: list[dict], data_hash: str,
              data_stats: dict, extra: dict) -> dict:
    evals = [h for h in history if "eval_loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"]) if evals else None
    rewarded = [h for h in history if "eval_reward" in h]
    if rewarded:  # a method that learns from rewards (GRPO): the highest held-out reward
        best = max(rewarded, key=lambda h: h["eval_reward"])
    m = recipe.method
    return {
        "name": recipe.entry_name,
        "base_model": recipe.model.name_or_path,
        "base_model_path": base_path,
        "method": m.type,
        "lora": ({"rank": m.rank, "alpha": m.alpha, "dropout": m.dropout,
                  "target_modules": m.target_modules} if m.type == "lora" else None),
        "dataset": {"files": recipe.data.train_files, "sha256": data_hash, **data_stats},
        "final_metrics": history[-1] if history else {},
        "best_metrics": best,
        "history": history,
        "recipe": recipe.model_dump(mode="json"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _publish(staging: Path, location: str) -> None:
    """Replace the entry at `location` with `staging` (atomically for local directories)."""
    if "://" in location:
        fs, path = filesystem(location)
        fs.delete_dir_contents(path, missing_dir_ok=True)
        pafs.copy_files(str(staging), path, destination_filesystem=fs)
        return
    target = Path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming = target.with_name(f".{target.name}.incoming")
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.copytree(staging, incoming)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(incoming, target)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(location: str) -> dict:
    """The entry's manifest; where `location` holds none, a ConfigError that names it and says
    what is there instead (every command that takes an entry reads this first)."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            text = f.read()
    except FileNotFoundError:
        found = _found(fs, path, MANIFEST)
        raise ConfigError(f"{location}: not a registry entry ({found})") from None
    except OSError as e:  # an object store's refusal: credentials, bucket, endpoint
        raise ConfigError(f"{location}: not a registry entry ({str(e).splitlines()[0]})") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{location}/{MANIFEST}: not valid JSON ({e})") from None


def check_local_model(location: str) -> None:
    """A ConfigError naming `location` unless it is a directory here holding a model to load: an
    entry's weights or adapter, or a base model's."""
    path = Path(location).expanduser()
    if not any((path / name).is_file() for name in MODEL_FILES):
        found = _found(pafs.LocalFileSystem(), str(path.absolute()), " or ".join(MODEL_FILES))
        raise ConfigError(f"{location}: not a registry entry nor a model directory ({found})")


def _found(fs, path: str, wanted: str) -> str:
    """What is at `path` where `wanted` is not: the usual mistake is a mistyped path."""
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return "nothing there"
    if kind == pafs.FileType.File:
        return "a file, not a directory"
    return f"no {wanted} in it"


def update_manifest(location: str, fields: dict) -> dict:
    """Merge `fields` into the entry's manifest (the model files stay as they are)."""
    manifest = {**read_manifest(location), **fields}
    text = json.dumps(manifest, indent=2) + "\n"
    fs, path = filesystem(location)
    if "://" in location:
        with fs.open_output_stream(f"{path}/{MANIFEST}") as f:
            f.write(text.encode())
        return manifest
    incoming = Path(path, f".{MANIFEST}.incoming")
    incoming.write_text(text)
    os.replace(incoming, Path(path, MANIFEST))  # a reader sees the old manifest or the new
    return manifest
