"""Rows of fixed length from tokenized samples: packed or padded.

    rows = pack(samples, max_seq_len, pad_id)

Packing puts several samples in one row with positions restarting per sample; transformers
reads those restarts and keeps each token's attention inside its own sample.
"""

from __future__ import annotations

import numpy as np

from attune.train.tokenizing import IGNORE


def pack(samples: list[dict], max_seq_len: int, pad_id: int) -> list[dict]:
    """First-fit-decreasing packing into rows of max_seq_len; positions restart per sample."""
    bins: list[list[dict]] = []
    space: list[int] = []
    for sample in sorted(samples, key=lambda s: len(s["input_ids"]), reverse=True):
        n = len(sample["input_ids"])
        for b, free in enumerate(space):
            if n <= free:
                bins[b].append(sample)
                space[b] -= n
                break
        else:
            bins.append([sample])
            space.append(max_seq_len - n)
    return [_row(b, max_seq_len, pad_id) for b in bins]


def pad(samples: list[dict], max_seq_len: int, pad_id: int) -> list[dict]:
    """One sample per row (no packing)."""
    return [_row([s], max_seq_len, pad_id) for s in samples]


def _row(samples: list[dict], length: int, pad_id: int) -> dict:
    ids, labels, positions = [], [], []
    for s in samples:
        n = len(s["input_ids"])
        ids += s["input_ids"]
        # A sample's first token is never predicted: in a packed row the token before it
        # belongs to another sample.
        labels += [IGNORE] + s["labels"][1:]
        positions += range(n)
    fill = length - len(ids)
    return {
        "input_ids": np.array(ids + [pad_id] * fill, dtype=np.int64),
        "labels": np.array(labels + [IGNORE] * fill, dtype=np.int64),
        "position_ids": np.array(positions + list(range(fill)), dtype=np.int64),
        "num_tokens": np.int64(len(ids)),
    }
