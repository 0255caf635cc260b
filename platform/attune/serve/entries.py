"""Registry entries as the server sees them: what they are, whether they can be served, and
putting LoRA adapters where a running app loads them from (`attune promote`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.fs as pafs

from attune import registry
from attune.config import ConfigError
from attune.store import filesystem
from attune.serve.config import BaseModelSpec, ServeConfig


class NotServable(ConfigError):
    """A registry entry that this serving config cannot serve; the message says why."""


@dataclass(frozen=True)
class Entry:
    location: str
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def is_lora(self) -> bool:
        return self.manifest["method"] == "lora"


def read_entry(location: str) -> Entry:
    return Entry(location, registry.read_manifest(location))  # no entry there: a ConfigError


def base_for(entry: Entry, config: ServeConfig) -> BaseModelSpec:
    """The served base model an adapter was trained on."""
    for spec in config.base_models:
        if spec.name_or_path == entry.manifest["base_model"]:
            return spec
    raise NotServable(f"{entry.name}: trained on {entry.manifest['base_model']!r}, which is not "
                      f"among the served base models {[s.name_or_path for s in config.base_models]}")


def check_servable(entry: Entry, config: ServeConfig) -> None:
    """Refuse, with the reason, what vLLM would fail on later or serve wrongly."""
    files = set(_list(entry.location))
    if "tokenizer_config.json" not in files:
        raise NotServable(f"{entry.name}: no tokenizer (tokenizer_config.json) in the entry")
    tokenizer_config = json.loads(_read(entry.location, "tokenizer_config.json"))
    if "chat_template.jinja" not in files and not tokenizer_config.get("chat_template"):
        raise NotServable(f"{entry.name}: no chat template in the entry")
    if not tokenizer_config.get("eos_token"):
        raise NotServable(f"{entry.name}: the tokenizer sets no EOS token, so answers never end")
    if entry.is_lora:
        rank = entry.manifest["lora"]["rank"]
        if rank > config.engine.max_lora_rank:
            raise NotServable(f"{entry.name}: LoRA rank {rank} exceeds engine.max_lora_rank "
                              f"({config.engine.max_lora_rank})")
        if not config.lora_store:
            raise NotServable(f"{entry.name}: a LoRA adapter needs lora_store in the serving "
                              "config (an object-store URI, or a directory every serving node "
                              "sees)")
        if "adapter_config.json" not in files:
            raise NotServable(f"{entry.name}: no adapter_config.json")
        adapter = json.loads(_read(entry.location, "adapter_config.json"))
        if adapter.get("modules_to_save"):
            raise NotServable(f"{entry.name}: modules_to_save is not supported by vLLM")
        base_for(entry, config)
    elif "config.json" not in files:
        raise NotServable(f"{entry.name}: no model config.json")


def adapters_path(config: ServeConfig, base: BaseModelSpec) -> str:
    """Where a base model's adapters are in the store: the app lists its subfolders `<name>/` as
    adapters and serves each as model 'base:name'."""
    return f"{config.lora_store.rstrip('/')}/{base.id}"


def promote_adapter(entry: Entry, config: ServeConfig) -> str:
    """Copy a LoRA entry into the store the running app loads adapters from; returns its id."""
    check_servable(entry, config)
    base = base_for(entry, config)
    fs, path = filesystem(f"{adapters_path(config, base)}/{entry.name}")
    fs.create_dir(path, recursive=True)
    src_fs, src_path = filesystem(entry.location)
    pafs.copy_files(src_path, path, source_filesystem=src_fs, destination_filesystem=fs)
    return f"{base.id}:{entry.name}"


def promote_adapters(config: ServeConfig) -> None:
    """Copy each LoRA entry of the config into its store, where the app loads them from."""
    for location in config.entries:
        entry = read_entry(location)
        if entry.is_lora:
            promote_adapter(entry, config)


def _list(location: str) -> list[str]:
    fs, path = filesystem(location)
    return [info.base_name for info in fs.get_file_info(pafs.FileSelector(path))]


def _read(location: str, name: str) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(f"{path}/{name}") as f:
        return f.read().decode()
