"""Base models: resolve a name to a local directory, load for training.

    python -m attune.modeling attune:tiny-qwen2     # prints this node's copy (built on first use)

A name is one of the tiny models attune builds itself (attune.tiny_models: `attune:tiny-llama`,
`attune:tiny-qwen2`, `attune:tiny-llama3`), a Hugging Face id, a local directory or a store URI.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs
import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from attune.chat_templates import register_end_of_turn
from attune.config import ConfigError, attune_home
from attune.store import filesystem
# the tiny models' names, for whoever resolves or builds them
from attune.tiny_models import TINY_MODELS, TINY_SHAPE, ensure_tiny, ensure_tiny_llama  # noqa: F401

TINY_NAME = "attune:tiny-llama"  # the default base model


def resolve(name_or_path: str) -> str:
    """This node's copy of a base model: the tiny model built here on first use, a store URI
    (s3://, gs://) copied here once, a local path made absolute; a hub id unchanged (whoever
    loads it fetches it into this node's Hugging Face cache)."""
    if name_or_path.startswith("attune:"):
        if name_or_path not in TINY_MODELS:
            raise ConfigError(f"model.name_or_path: attune builds no {name_or_path!r}; it "
                              f"builds {', '.join(TINY_MODELS)}")
        return str(ensure_tiny(name_or_path))
    if "://" in name_or_path:
        return str(copied_from_store(name_or_path))
    if is_local_path(name_or_path):
        return str(Path(name_or_path).expanduser().absolute())
    return name_or_path


def node_ref(name_or_path: str) -> str:
    """What the driver hands other nodes for a base model: a name each node resolves itself
    (never a directory only the driver's node has, such as its built tiny model)."""
    return resolve(name_or_path) if is_local_path(name_or_path) else name_or_path


def resolve_on_node(ref: str, key: str = "model.name_or_path") -> str:
    """`resolve` in a worker, where a local directory must be one every node sees."""
    path = resolve(ref)
    if is_local_path(ref) and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}: {ref} is not on node {socket.gethostname()} "
                          f"({_node_ip()}): a local directory must be at the same path on every "
                          "node (a shared volume); or copy it to the model store and name its "
                          "s3:// or gs:// URI")
    return path


def is_local_path(name_or_path: str) -> bool:
    return name_or_path.startswith(("~", ".", "/"))


def copied_from_store(uri: str) -> Path:
    """A model directory in the object store, copied once per node (concurrent callers wait)."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]
    out = attune_home() / "cache" / "models" / f"{uri.rstrip('/').rsplit('/', 1)[-1]}-{digest}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            fs, path = filesystem(uri)
            if fs.get_file_info(f"{path.rstrip('/')}/config.json").type != pafs.FileType.File:
                raise ConfigError(f"model.name_or_path: {uri}: no model there (no config.json)")
            partial = out.with_name(out.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            pafs.copy_files(path, str(partial), source_filesystem=fs)
            partial.rename(out)
    return out


def _node_ip() -> str:
    try:
        import ray  # in a Ray worker only; resolve_on_node runs there

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: the hostname said it
        return "no Ray node"


def model_config(name_or_path: str, key: str = "model.name_or_path"):
    """The model's config (no weights), or a ConfigError naming `key` and saying why there is
    none: a directory without a model, a hub id that is neither cached nor reachable."""
    path = resolve(name_or_path)
    if is_local_path(name_or_path) or os.path.isdir(path):
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{key}: {name_or_path}: no model there (no config.json)")
    elif not isinstance(try_to_load_from_cache(path, "config.json"), str):
        _check_hub_reachable(name_or_path, key)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {name_or_path}: {str(e).splitlines()[0]}") from None


def _check_hub_reachable(model_id: str, key: str) -> None:
    """Fail in seconds, not after the hub client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ConfigError(f"{key}: {model_id!r} is not a local directory nor in the Hugging Face "
                          "cache, and HF_HUB_OFFLINE is set")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"{key}: {model_id!r} is not a local directory nor in the Hugging Face "
                          f"cache, and {endpoint.hostname} cannot be reached ({e}); download it "
                          "where the hub is reachable and name its directory") from None


def module_names(config) -> set[str]:
    """The names of the model's modules (the last part: q_proj, ...), built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def training_dtype(dtype: str, on_gpu: bool) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(path: str, chat_template: str | None = None):
    """The model's tokenizer; with a chat template of the recipe's, that template's end of turn
    is its eos_token (a special token, added where the model has a spare row for it)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = chat_template
        register_end_of_turn(tokenizer, AutoConfig.from_pretrained(path).vocab_size)
    return tokenizer


def load_model(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                attn_implementation=attn_implementation)


if __name__ == "__main__":
    print(resolve(sys.argv[1] if len(sys.argv) > 1 else TINY_NAME))
