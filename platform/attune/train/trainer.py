"""Ray Train wiring: the loop in a TorchTrainer, its data from Ray Data, the registry entry.

    entry = fine_tune(load_recipe("recipes/tiny-full.yaml"))

Everything Ray-specific about training lives here, its lines marked `# [n]`; the loop itself is
`attune.train.loop` (plain PyTorch). Recovery: a lost worker restarts the whole group from the latest
reported checkpoint (`FailureConfig`), and a run started again with the same name and storage
resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from attune import modeling, registry
from attune.capacity import check_fits, device_memory, working_nodes
from attune.cluster import ensure_ray
from attune.config import ConfigError
from attune.recipe import Recipe
from attune.store import say_if_maybe_node_local
from attune.tracking import train_run
from attune.train import datasets, methods, parallel
from attune.train.checkpoints import HISTORY_FILE, MODEL_DIR
from attune.train.datasets import PreparedData, prepare_data
from attune.train.loop import Loop, train_loop
from attune.train.preflight import check_memory, check_recipe
from attune.train.rewards import RewardError
from attune.train.rollouts import Rollouts, start_engines, stop_engines


def steps_per_epoch(recipe: Recipe, rows: int) -> int:
    per_worker = rows // recipe.scaling.num_workers  # Ray's equal split drops the remainder
    if per_worker == 0:
        raise ConfigError(f"scaling.num_workers: {rows} packed rows cannot feed "
                          f"{recipe.scaling.num_workers} workers; lower scaling.num_workers or "
                          "data.max_seq_len")
    return math.ceil(per_worker / recipe.optim.micro_batch_size / recipe.optim.grad_accum_steps)


def _train_worker(config: dict) -> None:
    """Runs in every Ray Train worker."""
    os.environ.update(config.get("env", {}))
    recipe = Recipe.model_validate(config["recipe"])
    base_path = modeling.resolve_on_node(config["base_model"])  # this node's copy
    micro = recipe.optim.micro_batch_size
    # [1] each worker reads its own shard of the packed rows
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    # [2] the run's own latest checkpoint (a restarted worker group) before the one it started from
    checkpoint = ray.train.get_checkpoint() or config.get("start_from")
    resume_from = checkpoint.to_directory() if checkpoint else None
    scratch = tempfile.mkdtemp(prefix="attune-ckpt-")

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        # [3] metrics to the controller (and Tune); the checkpoint to the run's storage
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # persisted by Ray by now

    cache: list[dict] = []

    def train_batches(epoch: int):
        if cache:  # a small shard, kept from its first pass: reshuffled in memory
            return datasets.batches(cache, micro, seed=recipe.optim.seed + epoch)
        # reshuffled every epoch
        batches = train_shard.iter_batches(batch_size=micro, batch_format="numpy",
                                           local_shuffle_buffer_size=4 * micro,
                                           local_shuffle_seed=recipe.optim.seed + epoch)
        return _keeping(batches, cache if config["cache_shard"] else None)

    eval_cache: list[dict] = []

    def eval_batches():
        if eval_cache:  # the same rows at every evaluation: read once, then kept
            return iter(eval_cache)
        batches = _keeping(eval_shard.iter_batches(batch_size=micro, batch_format="numpy"), None)
        return _recording(batches, eval_cache) if config["cache_eval"] else batches

    spec = methods.get(recipe.method.objective).engines(recipe)
    rollouts = _rollouts(spec, config["base_model"], recipe) if spec else None

    loop = Loop(
        train_batches=train_batches,
        # every worker evaluates the same rows, so FSDP's collectives stay in step
        eval_batches=eval_batches,
        steps_per_epoch=config["steps_per_epoch"],
        report=report,
        resume_from=resume_from,
        stop_at=config.get("stop_at"),
        checkpoint_root=scratch,
        device=ray.train.torch.get_device(),  # [4] the device Ray Train assigned this worker
        rollouts=rollouts,
    )
    try:
        train_loop(recipe, base_path, loop)
    finally:
        if rollouts and parallel.rank() == 0:
            stop_engines(rollouts.started)


def _rollouts(spec, model_ref: str, recipe: Recipe) -> Rollouts:
    """[9] Rank 0 starts the run's rollout engines (they end with it, or with its process) and
    hands them to every rank."""
    started = None
    if parallel.rank() == 0:
        context = ray.train.get_context()
        started = start_engines(spec, model_ref, dtype="bfloat16" if spec.gpus else "float32",
                                name=f"{context.get_experiment_name()}-{os.getpid()}")
    started = parallel.broadcast_object(started)
    return Rollouts(started, parallel.rank(), parallel.world_size())


def _keeping(batches, cache: list | None):
    """Yield torch batches; with a cache, also keep their rows (an epoch of a small shard)."""
    for batch in batches:
        if cache is not None:
            cache += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["num_tokens"]))]
        # A copy: Ray Data hands out read-only views of its blocks, which torch warns about on
        # every batch (and a tensor over one must not be written to); the batches are small.
        yield {k: torch.tensor(v) if v.dtype.kind in "biuf" else v for k, v in batch.items()}


def _recording(batches, cache: list):
    """Yield the batches; once all were read, `cache` holds them."""
    seen = []
    for batch in batches:
        seen.append(batch)
        yield batch
    cache[:] = seen


def make_trainer(recipe: Recipe, prepared: PreparedData, *,
                 storage_path: str | None = None, callbacks: list | None = None,
                 start_from=None,
                 stop_at: int | None = None) -> TorchTrainer:
    """The TorchTrainer for a recipe (Tune builds one per trial with its own callbacks).

    `start_from` and `stop_at` train one stretch of a longer run: from a checkpoint of this loop
    (a Ray Train or Tune Checkpoint: its step, optimizer and schedule) up to a step short of the
    recipe's end.
    """
    sc = recipe.scaling
    # A split runs a coordinator actor of its own; one worker reads the whole dataset without it.
    split = ["train"] if sc.num_workers > 1 else []
    return TorchTrainer(  # [5] the loop in every worker, the datasets sharded across them
        _train_worker,
        # the base model by a name every node resolves itself, never the driver's path
        train_loop_config={"recipe": recipe.model_dump(),
                           "base_model": modeling.node_ref(recipe.model.name_or_path),
                           "steps_per_epoch": steps_per_epoch(recipe, prepared.rows),
                           # A small shard is read once, then reshuffled in memory: each epoch
                           # through Ray Data costs a round of split coordination.
                           "cache_shard": _rows_bytes(recipe, prepared.rows // sc.num_workers)
                                          < SHARD_CACHE_BYTES,
                           # Likewise the eval rows, read again at every evaluation otherwise.
                           "cache_eval": _rows_bytes(recipe, prepared.eval_rows) < SHARD_CACHE_BYTES,
                           # fault injection (attune.train.loop) reaches workers of a running cluster
                           "env": {k: v for k, v in os.environ.items() if k.startswith("ATTUNE_FAULT_")},
                           "start_from": start_from, "stop_at": stop_at},
        # [6] how many workers, each with what
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.gpus_per_worker > 0,
                                     resources_per_worker=_resources(recipe),
                                     placement_strategy=sc.placement.upper()),
        run_config=RunConfig(
            # [7] where checkpoints persist; FailureConfig restarts the group from the latest
            name=recipe.name, storage_path=storage_path or storage_uri(recipe.output.runs),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.checkpoint.keep),
            failure_config=FailureConfig(max_failures=recipe.checkpoint.max_failures),
            callbacks=callbacks),
        datasets={"train": prepared.train, "eval": prepared.eval},
        dataset_config=ray.train.DataConfig(datasets_to_split=split),
    )


def fine_tune(recipe: Recipe) -> str:
    """Train the recipe on Ray and write its registry entry; returns the entry's location."""
    checked = check_recipe(recipe)  # before Ray starts: bad input fails in seconds
    base_path = checked.base_path
    ensure_ray()
    check_workers_fit(recipe)
    say_if_maybe_node_local({"output.runs": recipe.output.runs,
                             "output.registry": recipe.output.registry}, working_nodes())
    prepared = prepare_data(recipe, checked)
    s = prepared.stats
    print(f"[attune] data: {s['train_examples']} examples -> {s['train_rows']} rows of "
          f"{recipe.data.max_seq_len} tokens ({s['fill']:.1%} filled), {s['eval_examples']} for eval",
          flush=True)
    with train_run(recipe) as tracked:  # MLflow: the recipe now, the metrics at each report
        with _ctrl_c_given_back(), _reward_errors_in_one_line():
            # [8] run it, restarts included
            result = make_trainer(recipe, prepared, callbacks=tracked.callbacks).fit()
        entry = write_result(recipe, result, base_path, prepared, extra=tracked.manifest_fields)
        tracked.finish(entry)
    return entry


@contextmanager
def _reward_errors_in_one_line():
    """A reward that failed in a worker (attune.train.rewards) is its one line, not the workers'
    tracebacks Ray Train gathers."""
    try:
        yield
    except ray.train.WorkerGroupError as e:
        for error in e.worker_failures.values():
            while error is not None:  # Ray wraps a worker's exception; its cause is the original
                if isinstance(error, RewardError):
                    raise RewardError(str(error)) from None
                error = error.__cause__
        failure = re.search(r"RewardError: (.+)", str(e))  # where only the text survived
        if failure:
            raise RewardError(failure.group(1)) from None
        raise


@contextmanager
def _ctrl_c_given_back():
    """Ray Train's driver installs a SIGINT handler for its run (Ctrl-C aborts the run) and
    leaves it installed after fit() returns, where it swallows every later Ctrl-C of the process
    (serving after training, the demo's chat page). Put the process's own handler back.

    That handler ends an aborted run with sys.exit(0), its only SystemExit in fit(): raised
    again as the Ctrl-C it is, so the run's MLflow run ends KILLED and the process exits as a
    Ctrl-C asks (attune.cluster.exit_now)."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def write_result(recipe: Recipe, result, base_path: str, prepared: PreparedData,
                 extra: dict | None = None) -> str:
    """The registry entry for a finished run (its last checkpoint holds the final weights)."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        history = json.loads(Path(checkpoint_dir, HISTORY_FILE).read_text())
        return registry.write_entry(
            recipe, Path(checkpoint_dir, MODEL_DIR), history, base_path=base_path,
            tokenizer=modeling.load_tokenizer(base_path, recipe.data.chat_template),
            data_hash=prepared.files_hash, data_stats=prepared.stats, extra=extra)


SHARD_CACHE_BYTES = 256 * 2**20


def _rows_bytes(recipe: Recipe, rows: int) -> int:
    return rows * recipe.data.max_seq_len * 3 * 8  # 3 int64 columns


def check_workers_fit(recipe: Recipe, also: list[dict] = (), what: str = "") -> None:
    """Fail in seconds, not wait forever, when no placement of the run's workers (and `also`)
    fits the cluster's nodes, or the memory plan exceeds the devices they would get."""
    sc = recipe.scaling
    key = "scaling.gpus_per_worker" if sc.gpus_per_worker else "scaling.num_workers"
    spec = methods.get(recipe.method.objective).engines(recipe)
    engines = spec.bundles if spec else []
    check_fits([*also, *[_resources(recipe)] * sc.num_workers, *engines],
               what or f"{sc.num_workers} Train workers" + (f" and {len(engines)} rollout engines"
                                                             if engines else ""), key)
    if recipe.scaling.device_memory_gib is None:  # given, check_recipe planned it before Ray
        check_memory(recipe, *device_memory(recipe))


def _resources(recipe: Recipe) -> dict:
    resources = {"CPU": recipe.scaling.cpus_per_worker}
    if recipe.scaling.gpus_per_worker:
        resources["GPU"] = recipe.scaling.gpus_per_worker
    return resources


def storage_uri(location: str) -> str:
    """Ray Train's storage_path for a recipe's output.runs: a URI as is, a path made absolute."""
    return location if "://" in location else str(Path(location).expanduser().resolve())
