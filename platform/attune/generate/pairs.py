"""DPO pairs from rewards: each line's samples scored with the rewards GRPO uses; the best and
the worst answer become a pair in `data.format: preference`, and lines whose samples tie give none.

    n = write_pairs(config, rows)      # reads config.out, writes config.pairs
"""

from __future__ import annotations

import json
from collections import defaultdict

from attune.generate.config import GenerateConfig
from attune.generate.inputs import last_user_turn
from attune.train.rewards import load_rewards, score

# The input line's fields that are the prompt itself, not data a reward reads.
_PROMPT_FIELDS = ("messages", "prompt", "id")


def write_pairs(config: GenerateConfig, rows: list[dict]) -> int:
    rewards = load_rewards(config.rewards, key="--reward")
    samples = defaultdict(list)
    with open(config.out) as f:
        for raw in f:
            line = json.loads(raw)
            samples[str(line["id"])].append(line["completion"])
    pairs = []
    for row in rows:
        fields = {k: v for k, v in json.loads(row["line"]).items() if k not in _PROMPT_FIELDS}
        prompt = last_user_turn(row["messages"])
        scored = sorted(((sum(r.weight * v for r, v in zip(rewards, score(
            rewards, prompt, completion, fields, row["source"]))), completion)
            for completion in samples[row["id"]]), key=lambda s: s[0])
        if len(scored) < 2 or scored[0][0] == scored[-1][0]:
            continue  # a tie teaches nothing
        pairs.append({"id": row["id"], "messages": row["messages"], "chosen": scored[-1][1],
                      "rejected": scored[0][1]})
    with open(config.pairs, "w") as f:
        f.writelines(json.dumps(pair) + "\n" for pair in pairs)
    return len(pairs)
