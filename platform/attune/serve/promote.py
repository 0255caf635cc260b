"""Promotion: a registry entry becomes servable by an app built from a Serve config file.

    promote("~/.attune/registry/tiny-lora", "deployments/tiny.yaml")
"""

from __future__ import annotations

from pathlib import Path

import yaml

from attune.config import read_mapping
from attune.serve.config import app_args, config_from_file
from attune.serve.entries import check_servable, promote_adapter, read_entry
from attune.store import same_location


def promote(entry_location: str, config_path: str) -> str:
    """Returns a line saying what happened (and what to do next, for full models)."""
    config = config_from_file(config_path)
    entry = read_entry(entry_location)
    check_servable(entry, config)  # refuse with the reason before touching anything
    if entry.is_lora:
        model_id = promote_adapter(entry, config)
        return f"promoted {entry.name}: the running app serves it now as '{model_id}'"
    raw = read_mapping(config_path, "serving config")
    args = app_args(raw, config_path)
    # the shell expands `~` in the command; the file may keep it: one entry either way
    if not any(same_location(entry_location, listed) for listed in args.setdefault("entries", [])):
        args["entries"].append(entry_location)
        text = Path(config_path).read_text()
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        Path(config_path).write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return f"added {entry.name} to {config_path}; roll it out with: serve deploy {config_path}"
