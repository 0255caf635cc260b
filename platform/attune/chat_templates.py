"""Chat templates: the three families attune's tiny models use, and where a template ends a turn.

    marker = end_of_turn(tokenizer)            # '<|im_end|>' for ChatML, '<|eot_id|>' for Llama 3
    register_end_of_turn(tokenizer, rows)      # one special token, or a ConfigError saying why not

A model trained on a template learns to emit the template's end of turn after its answer; it stops
there only if that end is one token its tokenizer and vLLM know as an end (the tokenizer's
eos_token and the eos_token_id list of generation_config.json, which vLLM reads).
"""

from __future__ import annotations

from attune.config import ConfigError

# attune's own: the role in a tag, assistant turns ended by the EOS token.
ATTUNE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Qwen2's ChatML, without its default system prompt (it would cost every sample a dozen tokens).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3's header ids (its template less the tool-calling and date branches).
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_SENTINEL = "\u2063attune-answer\u2063"  # text no template writes by itself


def end_of_turn(tokenizer) -> str:
    """The text the tokenizer's chat template puts right after an assistant's words: rendered
    around a sentinel answer, the special token or first word that follows it."""
    chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    after = rendered.split(_SENTINEL, 1)[-1].lstrip() if _SENTINEL in rendered else ""
    special = [t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab())
               if after.startswith(t)]
    return max(special, key=len) if special else (after.split() or [""])[0]


def end_of_turn_id(tokenizer) -> int | None:
    """The end of turn's token id, None where the template ends turns with no single token."""
    try:
        ids = tokenizer.encode(end_of_turn(tokenizer), add_special_tokens=False)
    except Exception:  # a template that cannot render the probe chat: no trimming, no stop
        return None
    return ids[0] if len(ids) == 1 else None


def register_end_of_turn(tokenizer, embedding_rows: int, key: str = "data.chat_template") -> str:
    """Make the template's end of turn a special token and the tokenizer's eos_token.

    Where it is not a token yet, it is added, in one of the model's spare embedding rows (attune's
    tiny models keep some, as Qwen2 pads its vocabulary). Without a spare row the template is
    refused rather than the vocabulary resized: a LoRA adapter over a resized vocabulary is one
    vLLM cannot serve, and a multi-token end is one vLLM cannot stop on, so the model would run
    on to max_tokens after every answer.
    """
    marker = end_of_turn(tokenizer)
    if not marker:
        raise ConfigError(f"{key}: puts nothing after an assistant's words, so a model trained on "
                          "it never learns where an answer ends; end assistant turns with "
                          f"{{{{ eos_token }}}} ({tokenizer.eos_token!r}) or a marker of its own")
    if marker not in tokenizer.all_special_tokens:
        tokenizer.add_special_tokens({"extra_special_tokens": [marker]},
                                     replace_extra_special_tokens=False)
    if tokenizer.convert_tokens_to_ids(marker) >= embedding_rows:
        specials = ", ".join(repr(t) for t in tokenizer.all_special_tokens if t != marker)
        raise ConfigError(
            f"{key}: ends assistant turns with {marker!r}, which is not a token of this model's "
            f"tokenizer, and the model has no spare embedding row for a new one ({embedding_rows} "
            "rows, all used); the model could not learn to end its answers there nor vLLM stop "
            f"on it. End assistant turns with one of its special tokens ({specials}), or choose "
            "a base model whose tokenizer has it")
    tokenizer.eos_token = marker
    return marker
