"""Tokenizing a record with its chat template: token ids, and labels of IGNORE wherever no loss
is taken (in a chat, everything but the assistant's words and the end-of-turn token after them).

    sample = tokenize(record, tokenizer, max_seq_len)    # {"input_ids", "labels", "truncated"}
"""

from __future__ import annotations

from attune.chat_templates import end_of_turn_id
from attune.train.records import Record

IGNORE = -100  # the label of a token no loss is taken on (torch's cross_entropy ignore_index)


def tokenize(record: Record, tokenizer, max_seq_len: int) -> dict:
    """Token ids and labels; for chats, loss only on assistant turns. Truncates to max_seq_len."""
    if record.text is not None:
        ids = tokenizer(record.text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        ids, labels = tokenize_chat(record.messages, tokenizer)
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len],
            "truncated": len(ids) > max_seq_len}


def tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    # Render growing prefixes of the chat: the tokens an assistant turn adds to the prompt that
    # precedes it are the ones it is trained on. Works for any chat template, not just ours.
    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt,
                                             return_dict=False)

    # The turn's labels end at its end-of-turn token: what follows it (ChatML's newline) is the
    # template's, and the model, stopped at the end of turn, never writes it.
    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    end_id = end_of_turn_id(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False))
        turn = ids[start:end]
        if end_id in turn:
            end = start + len(turn) - turn[::-1].index(end_id)
        labels[start:end] = ids[start:end]
    return ids, labels
