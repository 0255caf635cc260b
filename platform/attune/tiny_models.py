"""The tiny base models attune builds itself: random weights in the shape of a real family.

    attune build-tiny                      # all three into ~/.attune/models

| name               | architecture                                     | chat template | end of turn  |
|--------------------|--------------------------------------------------|---------------|--------------|
| attune:tiny-llama  | LlamaForCausalLM, 4 heads                        | attune's      | `</s>`       |
| attune:tiny-qwen2  | Qwen2ForCausalLM: tied embeddings, q/k/v bias, GQA 4/2 | ChatML  | `<|im_end|>` |
| attune:tiny-llama3 | LlamaForCausalLM, GQA 4/2                        | Llama 3       | `<|eot_id|>` |

Each is two layers of 256 that fine-tune in a minute on two CPU cores, with a byte-level BPE
tokenizer trained on the bundled corpus plus its family's special tokens. Everything it knows comes
from fine-tuning. head_dim is 64 because vLLM's CPU attention kernels reject smaller heads. The
embedding has spare rows past the tokenizer (rounded up to a multiple of 64, as Qwen2 pads its
vocabulary), where a user's chat template gets its end-of-turn token (attune.chat_templates).
Every node builds the same bytes, so nodes are handed the name, never a path.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from attune import chat_templates
from attune.config import attune_home
from attune.corpus import examples

TINY_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
TINY_VOCAB = 2048  # the BPE trainer's ceiling; the bundled corpus yields about 1,200 tokens
ROWS_MULTIPLE = 64


@dataclass(frozen=True)
class Family:
    config_class: type
    model_class: type
    template: str
    special_tokens: list[str]  # ids 0, 1, ... in this order
    bos: str | None
    eos: str  # the tokenizer's: the end of an assistant turn
    pad: str
    ends: list[str]  # generation_config.json's eos_token_id: where vLLM stops
    shape: dict = field(default_factory=dict)  # what differs from TINY_SHAPE


TINY_MODELS = {
    "attune:tiny-llama": Family(
        LlamaConfig, LlamaForCausalLM, chat_templates.ATTUNE,
        ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"],
        bos="<s>", eos="</s>", pad="<pad>", ends=["</s>"], shape={"tie_word_embeddings": False}),
    "attune:tiny-qwen2": Family(
        Qwen2Config, Qwen2ForCausalLM, chat_templates.CHATML,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", ends=["<|im_end|>", "<|endoftext|>"],
        shape={"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "attune:tiny-llama3": Family(
        LlamaConfig, LlamaForCausalLM, chat_templates.LLAMA3,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
         "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        ends=["<|eot_id|>", "<|end_of_text|>"],
        shape={"num_key_value_heads": 2, "tie_word_embeddings": False}),
}


def ensure_tiny(name: str, root: Path | None = None) -> Path:
    """Build a tiny model once; concurrent callers (Ray workers) wait for the first one."""
    directory = name.split(":", 1)[1]
    out = (root or attune_home() / "models") / directory
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{directory}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            build_tiny(name, out)
    return out


def ensure_tiny_llama(root: Path | None = None) -> Path:
    return ensure_tiny("attune:tiny-llama", root)


def build_tiny(name: str, out: Path, seed: int = 0) -> Path:
    """Train the tokenizer on the bundled corpus, initialise the model, save both to `out`."""
    family = TINY_MODELS[name]
    tokenizer = _tokenizer(family)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = family.config_class(
        vocab_size=len(tokenizer), bos_token_id=ids(family.bos) if family.bos else None,
        eos_token_id=[ids(t) for t in family.ends] if len(family.ends) > 1 else ids(family.eos),
        pad_token_id=ids(family.pad), torch_dtype="float32", **(TINY_SHAPE | family.shape))
    model = family.model_class(config)
    # Appended after the others are drawn, so the spare rows leave the rest of the weights as
    # they were without them.
    model.resize_token_embeddings(len(tokenizer) + 1, pad_to_multiple_of=ROWS_MULTIPLE,
                                  mean_resizing=False)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
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


def _tokenizer(family: Family) -> PreTrainedTokenizerFast:
    texts = [m["content"] for e in examples() for m in e["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=family.special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, chat_template=family.template,
                                   model_max_length=TINY_SHAPE["max_position_embeddings"])


if __name__ == "__main__":
    for tiny in TINY_MODELS:
        print(ensure_tiny(tiny))
