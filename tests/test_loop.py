"""The training loop on its own (no Ray): what a resumed run trains with and what it reports.

    pytest tests/test_loop.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from attune.recipe import load_recipe
from attune.train.datasets import batches, local_rows
from attune.train.loop import Loop, train_loop
from attune.train.records import read_records

REPO = Path(__file__).resolve().parents[1]
# A constant lr, so the lr a step reports is the recipe's own; a report at every step.
QUICK = ["optim.max_steps=4", "optim.warmup_steps=0", "optim.schedule=constant",
         "eval.every_steps=1", "checkpoint.every_steps=2", "scaling.num_workers=1"]


@pytest.fixture(scope="module")
def rows(tiny_base):
    recipe = load_recipe(REPO / "recipes/tiny-full.yaml")
    records = read_records(recipe.data.train_files, recipe.data.format)[:16]
    return local_rows(records, recipe.method.objective, tiny_base, None, recipe.data.max_seq_len, packing=True)


def run(rows, base: str, checkpoints: Path, *overrides: str, resume_from=None, stop_at=None):
    recipe = load_recipe(REPO / "recipes/tiny-full.yaml", [*QUICK, *overrides])
    reports = []
    train_loop(recipe, base, Loop(
        train_batches=lambda epoch: batches(rows, 2, seed=epoch),
        steps_per_epoch=math.ceil(len(rows) / 2), resume_from=resume_from, stop_at=stop_at,
        checkpoint_root=str(checkpoints), report=lambda m, ckpt: reports.append((m, ckpt))))
    return reports


def test_a_resumed_run_trains_with_the_recipes_lr_not_the_saved_one(rows, tiny_base, tmp_path):
    """What PBT relies on: a trial cloned with a perturbed lr trains with that lr."""
    first = run(rows, tiny_base, tmp_path / "a", "optim.lr=1e-3", stop_at=2)
    assert [m["step"] for m, _ in first] == [1, 2]
    checkpoint = first[-1][1]
    assert checkpoint is not None  # stop_at ends with a checkpoint, short of max_steps

    second = run(rows, tiny_base, tmp_path / "b", "optim.lr=5e-3", resume_from=checkpoint)
    assert [m["step"] for m, _ in second] == [3, 4]
    assert all(m["lr"] == pytest.approx(5e-3) for m, _ in second)


def test_a_run_resumed_at_its_end_reports_its_last_result_again(rows, tiny_base, tmp_path):
    finished = run(rows, tiny_base, tmp_path / "a")
    last, checkpoint = finished[-1]
    again = run(rows, tiny_base, tmp_path / "b", resume_from=checkpoint)
    assert len(again) == 1
    metrics, copy = again[0]
    assert metrics == last and metrics["step"] == 4
    assert copy != checkpoint and (Path(copy) / "model").is_dir()


def test_eval_batches_are_kept_only_after_a_whole_pass():
    """A worker keeps its eval batches after reading them once (attune.train.trainer); a pass cut
    short must not leave a partial set to evaluate on from then on."""
    from attune.train.trainer import _recording

    cache: list = []
    partial = _recording(iter(range(3)), cache)
    next(partial)
    assert cache == []
    assert list(_recording(iter(range(3)), cache)) == [0, 1, 2] and cache == [0, 1, 2]


def test_a_worker_alone_is_not_replicated():
    """Ray Train runs even one worker distributed; with no other rank, DDP would only copy every
    gradient into its buckets and all-reduce it with itself, so the model is left unwrapped."""
    import torch
    import torch.distributed as dist

    from attune.train import parallel

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = parallel.wrap(torch.nn.Linear(2, 2), "ddp", torch.device("cpu"))
        assert not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        assert parallel.all_reduce_sum([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    finally:
        dist.destroy_process_group()
