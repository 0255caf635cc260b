"""Training benchmark: Ray Train's overhead over the plain loop, and packing efficiency.

    .venv/bin/python bench/train.py          (or: make bench-train)

1. Tokens/s of the same loop, model, data and steps, run (a) plain in this process and (b) in one
   Ray Train worker fed by Ray Data, alternating a, b, a, b so drift on a shared machine hits
   both. Both get the same CPU threads. The figure is the ratio b / a.
2. Packing efficiency on the bundled data: non-pad tokens / row capacity, packed vs one sample
   per row padded to the longest in its micro-batch.
Writes bench/results/train.json.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from attune import modeling  # noqa: E402
from attune.recipe import load_recipe  # noqa: E402
from attune.train import datasets  # noqa: E402
from attune.train.datasets import local_rows  # noqa: E402
from attune.train.loop import Loop, train_loop  # noqa: E402
from attune.train.records import read_records  # noqa: E402
from attune.train.rows import pack  # noqa: E402
from attune.train.tokenizing import tokenize  # noqa: E402

THREADS = 2
STEPS = 60
OVERRIDES = [f"optim.max_steps={STEPS}", "optim.micro_batch_size=4", "optim.warmup_steps=5",
             "scaling.num_workers=1", f"scaling.cpus_per_worker={THREADS}",
             # two measuring windows; the figure is the second (steady state: the first holds
             # start-up, e.g. Ray Data's first fetch)
             f"eval.every_steps={STEPS // 2}", f"eval.log_every_steps={STEPS // 2}",
             f"checkpoint.every_steps={STEPS}", "data.eval_files=[]"]


def plain_tokens_per_s(recipe, base: str) -> float:
    torch.set_num_threads(THREADS)
    records = read_records(recipe.data.train_files, recipe.data.format)
    rows = local_rows(records, recipe.method.objective, base, None, recipe.data.max_seq_len, recipe.data.packing)
    micro = recipe.optim.micro_batch_size
    metrics = train_loop(recipe, base, Loop(
        train_batches=lambda epoch: datasets.batches(rows, micro, seed=epoch),
        steps_per_epoch=math.ceil(len(rows) / micro), checkpoint_root=None))
    return metrics["tokens_per_s"]


def ray_tokens_per_s(recipe) -> float:
    from attune.train.trainer import fine_tune

    entry = fine_tune(recipe)
    return json.loads((Path(entry) / "attune.json").read_text())["final_metrics"]["tokens_per_s"]


def packing_efficiency(recipe, base: str) -> dict:
    tokenizer = modeling.load_tokenizer(base)
    records = read_records(recipe.data.train_files, recipe.data.format)
    lengths = [len(tokenize(r, tokenizer, 512)["input_ids"]) for r in records]
    out = {}
    for seq in (256, 512, 1024):
        samples = [{"input_ids": [0] * n, "labels": [0] * n} for n in lengths]
        rows = pack(samples, seq, pad_id=0)
        out[f"packed_{seq}"] = sum(lengths) / (len(rows) * seq)
    micro = recipe.optim.micro_batch_size
    order = np.random.default_rng(0).permutation(len(lengths))
    batches = [[lengths[i] for i in order[s:s + micro]] for s in range(0, len(order), micro)]
    out["padded_to_longest_in_batch"] = sum(lengths) / sum(max(b) * len(b) for b in batches)
    return out


def main() -> None:
    os.environ.setdefault("ATTUNE_HOME", "/tmp/attune-bench")
    base = modeling.resolve("attune:tiny-llama")
    plain, ray_runs = [], []
    for i in range(2):
        recipe = load_recipe("recipes/tiny-full.yaml", [f"name=bench-{i}-{time.time_ns()}", *OVERRIDES])
        plain.append(plain_tokens_per_s(recipe, base))
        ray_runs.append(ray_tokens_per_s(recipe))
    step_ms = 1000 * recipe.optim.micro_batch_size * recipe.data.max_seq_len / statistics.median(plain)
    result = {
        "steps": STEPS, "threads": THREADS, "approx_step_ms": step_ms,
        "plain_tokens_per_s": plain, "ray_train_tokens_per_s": ray_runs,
        "ratio_ray_over_plain": statistics.median(ray_runs) / statistics.median(plain),
        "packing": packing_efficiency(recipe, base),
    }
    out = Path("bench/results/train.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
