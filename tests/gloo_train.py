"""Runs attune's training loop in torchrun's processes (gloo, CPU), once per variant, and writes
each variant's per-step losses as JSON: how tests compare the memory settings without Ray.

    python -m torch.distributed.run --nproc-per-node 2 tests/gloo_train.py OUT.json BASE \
        --variant plain= --variant checkpointing=memory.activation_checkpointing=true ...

Every run sees the same global batches whatever the number of processes (rank r of w takes rows
r, r+w, ... of each), so a run on 2 processes and one on 1 train on the same data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from attune.recipe import load_recipe
from attune.train.datasets import local_rows
from attune.train.loop import Loop, train_loop
from attune.train.records import read_records

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("base")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=override,override,... (resume_from=DIR and stop_at=N too)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    distributed = dist.is_torchelastic_launched()
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    recipe = load_recipe(REPO / "recipes/tiny-full.yaml")
    records = read_records(recipe.data.train_files, recipe.data.format)[:64]
    rows = local_rows(records, "sft", args.base, None, 128, packing=True)

    def batches(epoch: int):
        for start in range(0, len(rows) - GLOBAL_BATCH + 1, GLOBAL_BATCH):
            mine = rows[start + rank:start + GLOBAL_BATCH:world]
            yield {k: torch.as_tensor(np.stack([r[k] for r in mine]))
                   for k in mine[0]}

    results = {}
    for variant in args.variant:
        name, _, spec = variant.partition("=")
        overrides = [o for o in spec.split(",") if o]
        loop_args = dict(o.split("=", 1) for o in overrides if o.startswith(("resume_from=",
                                                                               "stop_at=", "checkpoints=")))
        overrides = [o for o in overrides if o.split("=", 1)[0] not in loop_args]
        run = load_recipe(REPO / "recipes/tiny-full.yaml", [
            f"optim.max_steps={args.steps}", "optim.warmup_steps=0", "optim.schedule=constant",
            "eval.every_steps=1", "checkpoint.every_steps=1000", "data.max_seq_len=128",
            f"scaling.num_workers={world}", *overrides])
        reports = []
        torch.manual_seed(0)
        train_loop(run, args.base, Loop(
            train_batches=batches, steps_per_epoch=len(rows) // GLOBAL_BATCH,
            resume_from=loop_args.get("resume_from"),
            stop_at=int(loop_args["stop_at"]) if "stop_at" in loop_args else None,
            checkpoint_root=loop_args.get("checkpoints"),
            report=lambda metrics, ckpt: reports.append({**metrics, "checkpoint": ckpt})))
        results[name] = reports
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
