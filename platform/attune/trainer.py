"""Ray Train wiring: the recipe's data as Ray Datasets, the loop in a TorchTrainer, the entry.

    entry = fine_tune(load_recipe("recipes/tiny-full.yaml"))

Everything Ray-specific about training lives here; the loop itself is `attune.loop`.
Recovery: a lost worker restarts the whole group from the latest reported checkpoint
(`FailureConfig`), and a run started again with the same name and storage resumes from it.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from attune import data, modeling, registry
from attune.config import Recipe
from attune.serve.config import HA_PROXY_ENV

# Where the State API looks first for a cluster's dashboard (ray.dashboard.utils).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


@dataclass
class PreparedData:
    train: "ray.data.Dataset"
    eval: "ray.data.Dataset"
    rows: int
    eval_rows: int
    files_hash: str
    stats: dict


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS when set (or when running as a Ray job), else start Ray in-process."""
    # Ray Data's progress bars flood the logs of a job whose datasets are tiny.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # Logical CPUs beyond the cores: Train's workers, Data's tasks and Serve's actors each
        # claim one while mostly waiting on each other.
        # address="local": a new cluster, never one that `ray start` left running on this machine.
        dashboard_port = free_port()
        env = embedded_cluster_env(f"http://127.0.0.1:{dashboard_port}", serve_ports=own_serve_ports())
        with _set_for_ray_init(env):
            ray.init(address="local", num_cpus=num_cpus or max(6, 2 * (os.cpu_count() or 1)),
                     dashboard_port=dashboard_port, log_to_driver=True)


def embedded_cluster_env(dashboard_url: str, cores: int | None = None,
                         serve_ports: dict[str, str] | None = None) -> dict[str, str]:
    """What the Ray that attune starts in-process (no RAY_ADDRESS) runs with: a whole cluster on
    the user's one machine, where its workers are the job. The raylet and every worker it starts
    read these from the environment of `ray.init`; the user's own niceness or thread count wins.

    RAY_API_SERVER_ADDRESS: the State API of the cluster's workers finds its cluster through
      RAY_ADDRESS or else through the last `ray start`'s /tmp/ray/ray_current_cluster, which an
      in-process cluster never writes. Train's PlacementGroupCleaner asks it whether the run's
      controller is alive: on a machine where a `ray start` cluster once ran, each question hung
      40 s on the dead address and every Train run's end waited 12 s for the cleaner (measured);
      pointed at another live cluster, it would find no controller and remove a running trial's
      placement group.
    RAY_worker_niceness: Ray starts every worker at nice 15, below its own daemons, as on a
      shared node. Here the workers are the vLLM engine and its HTTP server (and Train's
      workers): at 15 anything else on the machine goes first, the client included. 2 cores,
      2 rounds interleaved with `vllm serve` (which runs at 0): 0.75 / 0.96 / 0.94 of its
      tokens/s at concurrency 1 / 8 / 32 at nice 15, 0.95 / 0.97 / 1.00 at 0 (README, Serving
      benchmark, for the later full run).
    RAY_SERVE_HAPROXY_NBTHREAD: Ray's default is 4 threads for direct streaming's HAProxy, sized
      for a big node; one per two cores here (on 2 cores HAProxy's CPU per streamed token went
      from 0.03 to 0.02 ms).
    RAY_SERVE_CONTROL_LOOP_INTERVAL_S: Serve's controller reconciles every 0.1 s by default, 3.6%
      of a core here while nothing changes; at 0.5 s it takes 1.6% (CPU-s of every process over
      20 s idle and under load), and replacing a dead replica or scaling reacts 0.4 s later at
      most.
    RAY_SERVE_ENABLE_HA_PROXY: HAProxy instead of Serve's Python proxy in front of the app's
      ingress replicas, which then answer HTTP themselves: one Python process fewer on every
      streamed token. The default app on 2 cores: 1.29 / 1.59 / 1.44x the tokens/s at
      concurrency 1 / 8 / 32, first tokens 9 / 70 / 215 ms sooner (bench/serve.py, 2 rounds),
      0.67x the CPU-s for the same requests (one A/B). Direct streaming needs it.
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S: an ingress replica behind HAProxy stays up
      30 s after it is told to stop, for outside load balancers to take it out; here only the
      node's own HAProxy sends it requests, and that one retries a refused connection. 2 s keeps
      a Ctrl-C or a redeploy from waiting the 30.
    `serve_ports` (own_serve_ports): the ports of Serve's HAProxy and its fallback proxy.
    """
    cores = cores or os.cpu_count() or 1
    defaults = {"RAY_worker_niceness": "0",
                "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, cores // 2))),
                "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
                HA_PROXY_ENV: "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                **(serve_ports or {})}
    return {API_SERVER_ENV: dashboard_url,
            **{name: os.environ.get(name, value) for name, value in defaults.items()}}


def own_serve_ports(next_port: Callable[[], int] | None = None) -> dict[str, str]:
    """Ports of Serve's HAProxy and its fallback proxy for a Ray cluster on a machine that may
    run another (a second `attune serve`, a `ray start` cluster). Ray's are fixed, and the tests
    saw two clusters meet on them: HAProxy's stats and metrics on 8404 and 9101, which a second
    HAProxy cannot bind, so it does not start at all; and the fallback proxy that HAProxy sends
    requests to while no ingress replica is up, on 8500 (HTTP) and 9500 (gRPC), where the second
    cluster's HAProxy found the first cluster's proxy and answered with the first cluster's
    models. (Ingress replicas' own ports need nothing: a replica whose port is taken tries the
    next.)"""
    next_port = next_port or spare_ports().__next__
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(next_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(next_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(next_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(next_port())}


# Ports for servers that start later than they are chosen: below the kernel's ephemeral range
# (32768-60999 by default), from which every process's outgoing connections and Ray's own
# listeners get theirs. A free port from that range was taken again before Serve started (a
# `make demo` run: its fallback proxy could not bind; a test's `ray start --head` that died at
# once, its logs empty).
SPARE_PORTS = range(20000, 32000)


def spare_ports() -> Iterator[int]:
    """Free ones of SPARE_PORTS, in random order, each once."""
    import random

    for port in random.sample(SPARE_PORTS, len(SPARE_PORTS)):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # fails if any address of the machine holds it
            except OSError:
                continue
        yield port


@contextmanager
def _set_for_ray_init(variables: dict[str, str]):
    """Set variables for `ray.init` only: the raylet hands its environment to every worker it
    starts, but this driver's own subprocesses (`ray job submit` to another cluster) must not
    inherit them."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def free_port() -> int:
    return next(spare_ports())


def prepare_data(recipe: Recipe, tokenizer_path: str) -> PreparedData:
    """Validate every line on the driver (errors name file:line), then tokenize with Ray Data."""
    d = recipe.data
    records = data.read_records(d.train_files, d.format)
    if d.eval_files:
        train_records, eval_records = records, data.read_records(d.eval_files, d.format)
    else:
        train_records, eval_records = data.split_eval(records, d.eval_fraction, recipe.optim.seed)
    tokenize = dict(fn_kwargs=dict(tokenizer_path=tokenizer_path, chat_template=d.chat_template,
                                   max_seq_len=d.max_seq_len, packing=d.packing),
                    batch_size=4096)
    train_ds = ray.data.from_items(data.as_items(train_records)).map_batches(data.tokenize_batch, **tokenize)
    eval_ds = ray.data.from_items(data.as_items(eval_records)).map_batches(data.tokenize_batch, **tokenize)
    train_ds, eval_ds = train_ds.materialize(), eval_ds.materialize()
    rows = train_ds.count()
    # A task per block rather than Dataset.sum, whose shuffle actors took 3 s to start here.
    tokens = sum(row["num_tokens"] for row in train_ds.map_batches(_block_tokens, batch_size=None).take_all())
    stats = {"train_examples": len(train_records), "eval_examples": len(eval_records),
             "train_rows": rows, "train_tokens": int(tokens),
             "fill": tokens / (rows * d.max_seq_len)}
    files = d.train_files + d.eval_files
    return PreparedData(train_ds, eval_ds, rows, eval_ds.count(), data.files_hash(files), stats)


def _block_tokens(batch: dict) -> dict:
    return {"num_tokens": [int(batch["num_tokens"].sum())]}


def steps_per_epoch(recipe: Recipe, rows: int) -> int:
    per_worker = rows // recipe.scaling.num_workers  # Ray's equal split drops the remainder
    if per_worker == 0:
        raise ValueError(f"{rows} packed rows cannot feed {recipe.scaling.num_workers} workers; "
                         "lower scaling.num_workers or data.max_seq_len")
    return math.ceil(per_worker / recipe.optim.micro_batch_size / recipe.optim.grad_accum_steps)


def _train_worker(config: dict) -> None:
    """Runs in every Ray Train worker."""
    from attune.loop import Loop, train_loop

    os.environ.update(config.get("env", {}))
    recipe = Recipe.model_validate(config["recipe"])
    micro = recipe.optim.micro_batch_size
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    # The run's own latest checkpoint (a restarted worker group) before the one it started from.
    checkpoint = ray.train.get_checkpoint() or config.get("start_from")
    resume_from = checkpoint.to_directory() if checkpoint else None
    scratch = tempfile.mkdtemp(prefix="attune-ckpt-")

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # persisted by Ray by now

    cache: list[dict] = []

    def train_batches(epoch: int):
        if cache:  # a small shard, kept from its first pass: reshuffled in memory
            return data.batches(cache, micro, seed=recipe.optim.seed + epoch)
        # [1] each worker reads its own shard of the packed rows, reshuffled every epoch
        batches = train_shard.iter_batches(batch_size=micro, batch_format="numpy",
                                           local_shuffle_buffer_size=4 * micro,
                                           local_shuffle_seed=recipe.optim.seed + epoch)
        return _keeping(batches, cache if config["cache_shard"] else None)

    eval_cache: list[dict] = []

    def eval_batches():
        if eval_cache:  # the same rows at every evaluation: read once, then kept
            return iter(eval_cache)
        batches = eval_shard.iter_torch_batches(batch_size=micro)
        return _recording(batches, eval_cache) if config["cache_eval"] else batches

    loop = Loop(
        train_batches=train_batches,
        # every worker evaluates the same rows, so FSDP's collectives stay in step
        eval_batches=eval_batches,
        steps_per_epoch=config["steps_per_epoch"],
        report=report,
        resume_from=resume_from,
        stop_at=config.get("stop_at"),
        checkpoint_root=scratch,
        device=ray.train.torch.get_device(),  # [2] the device Ray Train assigned this worker
    )
    train_loop(recipe, config["base_path"], loop)


def _keeping(batches, cache: list | None):
    """Yield torch batches; with a cache, also keep their rows (an epoch of a small shard)."""
    import torch

    for batch in batches:
        if cache is not None:
            cache += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
        # A copy: Ray Data hands out read-only views of its blocks, which torch warns about on
        # every batch (and a tensor over one must not be written to); the batches are small.
        yield {k: torch.tensor(v) for k, v in batch.items()}


def _recording(batches, cache: list):
    """Yield the batches; once all were read, `cache` holds them."""
    seen = []
    for batch in batches:
        seen.append(batch)
        yield batch
    cache[:] = seen


def make_trainer(recipe: Recipe, base_path: str, prepared: PreparedData, *,
                 storage_path: str | None = None, callbacks: list | None = None,
                 start_from=None,
                 stop_at: int | None = None) -> TorchTrainer:
    """The TorchTrainer for a recipe (Tune builds one per trial with its own callbacks).

    `start_from` and `stop_at` train one stretch of a longer run: from a checkpoint of this loop
    (a Ray Train or Tune Checkpoint: its step, optimizer and schedule) up to a step short of the
    recipe's end.
    """
    sc = recipe.scaling
    # A split runs a coordinator actor of its own; one worker reads the whole dataset without
    # it (4-5 s of each 1-worker run here, such as a Tune trial's)
    split = ["train"] if sc.num_workers > 1 else []
    return TorchTrainer(
        _train_worker,
        train_loop_config={"recipe": recipe.model_dump(), "base_path": base_path,
                           "steps_per_epoch": steps_per_epoch(recipe, prepared.rows),
                           # Datasets this small are read once, then reshuffled in memory: on a
                           # tiny dataset every few steps is an epoch, and each one costs Ray Data
                           # a round of split coordination.
                           "cache_shard": _rows_bytes(recipe, prepared.rows // sc.num_workers)
                                          < SHARD_CACHE_BYTES,
                           # Likewise the eval rows: each pass through Ray Data took 1.3 s of
                           # a 0.3 s evaluation (tiny model, 1 worker), at every eval step.
                           "cache_eval": _rows_bytes(recipe, prepared.eval_rows) < SHARD_CACHE_BYTES,
                           # fault injection (attune.loop) reaches workers of a running cluster
                           "env": {k: v for k, v in os.environ.items() if k.startswith("ATTUNE_FAULT_")},
                           "start_from": start_from, "stop_at": stop_at},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.gpus_per_worker > 0,
                                     resources_per_worker=_resources(recipe)),
        run_config=RunConfig(
            name=recipe.name, storage_path=storage_path or _storage(recipe.output.runs),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.checkpoint.keep),
            failure_config=FailureConfig(max_failures=recipe.checkpoint.max_failures),
            callbacks=callbacks),
        datasets={"train": prepared.train, "eval": prepared.eval},
        dataset_config=ray.train.DataConfig(datasets_to_split=split),
    )


def fine_tune(recipe: Recipe) -> str:
    """Train the recipe on Ray and write its registry entry; returns the entry's location."""
    base_path = modeling.resolve(recipe.model.name_or_path)
    ensure_ray()
    prepared = prepare_data(recipe, base_path)
    s = prepared.stats
    print(f"[attune] data: {s['train_examples']} examples -> {s['train_rows']} rows of "
          f"{recipe.data.max_seq_len} tokens ({s['fill']:.1%} filled), {s['eval_examples']} for eval",
          flush=True)
    result = make_trainer(recipe, base_path, prepared).fit()
    return write_result(recipe, result, base_path, prepared)


def write_result(recipe: Recipe, result, base_path: str, prepared: PreparedData,
                 extra: dict | None = None) -> str:
    """The registry entry for a finished run (its last checkpoint holds the final weights)."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        return registry.write_entry(recipe, Path(checkpoint_dir), base_path,
                                    data_hash=prepared.files_hash, data_stats=prepared.stats,
                                    extra=extra)


SHARD_CACHE_BYTES = 256 * 2**20


def _rows_bytes(recipe: Recipe, rows: int) -> int:
    return rows * recipe.data.max_seq_len * 3 * 8  # 3 int64 columns


def _resources(recipe: Recipe) -> dict:
    resources = {"CPU": recipe.scaling.cpus_per_worker}
    if recipe.scaling.gpus_per_worker:
        resources["GPU"] = recipe.scaling.gpus_per_worker
    return resources


def _storage(location: str) -> str:
    return location if "://" in location else str(Path(location).expanduser().resolve())
