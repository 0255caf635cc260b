"""Base models: resolve a name to a local directory, build the tiny default, load for training.

    python -m attune.modeling            # builds attune:tiny-llama into ~/.attune/models

`attune:tiny-llama` is a Llama-architecture model small enough to fine-tune in a minute on two
CPU cores, with a byte-level BPE tokenizer trained on the bundled corpus. Its weights are random:
everything it knows comes from fine-tuning. head_dim is 64 because vLLM's CPU attention kernels
reject smaller heads. Any other name is a Hugging Face id or a local directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs
import torch
from huggingface_hub import try_to_load_from_cache
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from attune.config import ConfigError, attune_home
from attune.corpus import examples
from attune.store import filesystem

TINY_NAME = "attune:tiny-llama"

# Ends every assistant turn with the EOS token, so generation stops where the answer does.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
TINY_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
TINY_VOCAB = 2048


def resolve(name_or_path: str) -> str:
    """This node's copy of a base model: the tiny model built here on first use, a store URI
    (s3://, gs://) copied here once, a local path made absolute; a hub id unchanged (whoever
    loads it fetches it into this node's Hugging Face cache)."""
    if name_or_path == TINY_NAME:
        return str(ensure_tiny_llama())
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


def ensure_tiny_llama(root: Path | None = None) -> Path:
    """Build the tiny model once; concurrent callers (Ray workers) wait for the first one."""
    out = (root or attune_home() / "models") / "tiny-llama"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".tiny-llama.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            build_tiny_llama(out)
    return out


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    """Train the tokenizer on the bundled corpus, initialise the model, save both to `out`."""
    texts = [m["content"] for e in examples() for m in e["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                                        model_max_length=TINY_SHAPE["max_position_embeddings"])

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, torch_dtype="float32", **TINY_SHAPE)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".partial")
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for one small file, in the middle of a run's output
    try:
        model.save_pretrained(tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def training_dtype(dtype: str, on_gpu: bool) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(path: str, chat_template: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                attn_implementation=attn_implementation)


if __name__ == "__main__":
    print(ensure_tiny_llama())
