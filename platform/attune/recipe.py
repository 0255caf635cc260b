"""The recipe: one YAML file that says what to fine-tune, on what, and how.

    recipe = load_recipe("recipes/tiny-full.yaml", ["optim.lr=1e-3", "scaling.num_workers=1"])

`train`, `tune`, `serve` and `chat` all read the same recipe, so what was trained is what is
served. Every field carries a description; unknown keys, wrong types and impossible
combinations fail here, before any cluster work, with the key's dotted path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from attune.config import (StrictConfig, apply_override, attune_home, read_mapping, validate,
                           validate_section)
from attune.train import methods


class ModelConfig(StrictConfig):
    name_or_path: str = Field(
        "attune:tiny-llama",
        description="Base model: a Hugging Face id, a local directory, an s3:// or gs:// copy, "
        "or one of the tiny models attune builds itself, no network needed: 'attune:tiny-llama', "
        "'attune:tiny-qwen2', 'attune:tiny-llama3'.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training dtype; 'auto' is bfloat16 on GPU and float32 on CPU."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="Attention kernel passed to transformers. 'auto': flash_attention_2 on "
        "GPU where flash-attn is installed (packed samples then use its variable-length kernel "
        "instead of a block mask), else sdpa.")
    compile: bool = Field(False, description="torch.compile the model before training (GPU).")


class DataConfig(StrictConfig):
    train_files: list[str] = Field(
        default_factory=lambda: ["data/transformer_qa.jsonl"],
        description="JSONL files to train on (paths relative to the working directory).",
    )
    format: Literal["messages", "prompt_completion", "alpaca", "text", "preference", "prompts"] = Field(
        "messages",
        description="Line format: OpenAI 'messages', 'prompt'/'completion', alpaca "
        "('instruction'/'input'/'output'), plain 'text', 'preference' pairs for DPO "
        "('prompt' or 'messages', then 'chosen' and 'rejected' answers), or 'prompts' for GRPO "
        "('prompt' or 'messages'; the line's other fields go to the reward functions).",
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template overriding the tokenizer's own (None keeps it)."
    )
    max_seq_len: int = Field(512, gt=8, description="Tokens per training sequence.")
    packing: bool = Field(
        True, description="Pack several samples into one sequence; positions restart per sample "
        "and no token attends across samples.",
    )
    eval_files: list[str] = Field(
        default_factory=list, description="JSONL files held out for eval loss; if empty, "
        "eval_fraction of the training lines is held out instead.",
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="Share of training lines held out for eval loss when "
        "eval_files is empty (0 evaluates on the training data itself).",
    )


class MethodConfig(StrictConfig):
    """Full or LoRA, and the training method (`objective`); the method's own fields (DPO's
    `beta`, ...) sit beside `objective` and are validated against the method's `Options`."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    type: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA (peft).")
    objective: str = Field(
        "sft", description="The training method: 'sft' (next-token loss on the answers), 'dpo' "
        "(Direct Preference Optimization on preference pairs, data.format: preference, against "
        "the base model as reference; under LoRA the same weights with the adapters off), or one "
        "registered in attune.train.methods (docs/training.md).")
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Module names that get LoRA adapters.",
    )
    _options: StrictConfig | None = PrivateAttr(None)

    @classmethod
    def extra_fields(cls) -> dict:
        """The registered methods' own fields: keys an override may set under `method.`."""
        return methods.option_fields()

    @field_validator("type", mode="before")
    @classmethod
    def _dpo_is_an_objective(cls, value):
        if value in methods.names():
            raise ValueError(f"'{value}' is an objective, not a type: set method.objective: "
                             f"{value}, with method.type full or lora")
        return value

    @field_validator("objective")
    @classmethod
    def _a_known_method(cls, value):
        methods.get(value)  # names the known ones
        return value

    @model_validator(mode="after")
    def _method_options(self) -> "MethodConfig":
        method = methods.get(self.objective)
        given = dict(self.__pydantic_extra__ or {})
        for key in given:
            if key not in method.Options.model_fields and methods.owners(key):
                raise ValueError(f"method.{key}: a field of method.objective "
                                 f"{' / '.join(methods.owners(key))}, not of {self.objective}")
        self._options = validate_section(method.Options, given, "method")
        # the defaults written out too, so a dump (tracking's parameters) shows every value
        self.__pydantic_extra__ = self._options.model_dump()
        return self

    @property
    def options(self):
        """The method's own fields, validated (e.g. `recipe.method.options.beta` for DPO)."""
        return self._options


class OptimConfig(StrictConfig):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None: off).")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data, used "
                                 "when max_steps is not set.")
    seed: int = Field(0, description="Seed for model init (LoRA), data order and dropout.")


class ScalingConfig(StrictConfig):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each).")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker; 0 trains on CPU.")
    cpus_per_worker: float = Field(1, gt=0, description="Logical CPUs Ray reserves per worker.")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="DDP replicates the model; FSDP2 "
                                             "(fully_shard) shards it per decoder layer.")
    placement: Literal["pack", "spread"] = Field(
        "pack", description="pack: fill a node before the next (fewer nodes, faster collectives); "
        "spread: each worker on a different node where the cluster has enough.")
    device_memory_gib: float | None = Field(
        None, gt=0, description="Memory of one worker's device, for the memory plan `attune "
        "train` checks first. None: from the cluster (the GPUs' accelerator type; for CPU "
        "workers, the node's memory shared by its workers).")


class MemoryConfig(StrictConfig):
    activation_checkpointing: bool | None = Field(
        None, description="Recompute each decoder layer's activations in the backward pass "
        "instead of keeping them: activations of one layer at a time, about a third more "
        "compute. None: on with GPUs, off on CPU.")
    mixed_precision: bool | None = Field(
        None, description="bf16 compute over fp32 master weights, fp32 optimizer states and "
        "fp32 gradient reduction (FSDP2 MixedPrecisionPolicy; autocast under DDP). Off: "
        "everything in model.dtype. None: on for full fine-tuning with GPUs and model.dtype auto.")
    loss_chunk_tokens: int | None = Field(
        1024, ge=16, description="Compute the output layer and the loss this many tokens at a "
        "time, recomputed in the backward pass, so the [tokens, vocab] fp32 logits never exist "
        "at once. None: the whole logits at once.")
    cpu_offload: bool = Field(
        False, description="FSDP2 CPU offload: parameters, gradients and optimizer states live "
        "in host memory and the optimizer steps there; fits a larger model on fewer GPUs, "
        "slower. Needs scaling.strategy fsdp.")
    load_on_rank0: bool = Field(
        True, description="Rank 0 reads the weights and broadcasts them into the other ranks' "
        "shards, which build the model on the meta device: host memory per node does not grow "
        "with its GPU count. False: every rank reads the whole model.")


class CheckpointConfig(StrictConfig):
    every_steps: int = Field(50, ge=1, description="Save a checkpoint every N optimizer steps.")
    keep: int = Field(2, ge=1, description="Checkpoints Ray Train keeps (the latest K).")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts from the latest "
                              "checkpoint before the run fails.")


class EvalConfig(StrictConfig):
    every_steps: int = Field(25, ge=1, description="Eval loss (and a report) every N steps.")
    log_every_steps: int = Field(10, ge=1, description="Progress line every N steps.")


class OutputConfig(StrictConfig):
    registry: str = Field(
        default_factory=lambda: str(attune_home() / "registry"),
        description="Registry root: a local directory or a pyarrow filesystem URI "
        "(s3://bucket/prefix, gs://...). Default: $ATTUNE_HOME/registry.",
    )
    name: str | None = Field(None, description="Entry name; defaults to the recipe's name.")
    runs: str = Field(default_factory=lambda: str(attune_home() / "runs"),
                      description="Ray Train storage (checkpoints, run state); a run started "
                      "again with the same name resumes from here. Default: $ATTUNE_HOME/runs.")


class TrackingConfig(StrictConfig):
    mlflow: bool = Field(True, description="Track the run in MLflow: the recipe as parameters, "
                         "each report's metrics, the loss curve, a link to the registry entry "
                         "(whose manifest records the run id). A search tracks each trial.")
    uri: str | None = Field(None, description="MLflow tracking URI: a server (http://...) or a "
                            "database (sqlite:///..., postgresql://...). Default: "
                            "$MLFLOW_TRACKING_URI, else sqlite under $ATTUNE_HOME/mlflow on the "
                            "driver's node.")
    experiment: str = Field("attune", description="The MLflow experiment runs are filed under.")


class Recipe(StrictConfig):
    name: str = Field(description="Run and registry-entry name.", pattern=r"^[A-Za-z0-9._-]+$")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Full or LoRA.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimisation.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig,
                                         description="Checkpoints and recovery.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig,
                                 description="Memory machinery for large models.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and logging.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig,
                                     description="Experiment tracking (MLflow).")

    @model_validator(mode="after")
    def _check_combinations(self) -> "Recipe":
        o = self.optim
        if o.max_steps is None and o.epochs is None:
            raise ValueError("optim: set optim.max_steps or optim.epochs")
        if o.max_steps is not None and o.warmup_steps >= o.max_steps:
            raise ValueError(f"optim.warmup_steps ({o.warmup_steps}) must be below "
                             f"optim.max_steps ({o.max_steps})")
        if self.model.attn_implementation == "flash_attention_2" and self.scaling.gpus_per_worker == 0:
            raise ValueError("model.attn_implementation: flash_attention_2 needs a GPU "
                             "(scaling.gpus_per_worker > 0)")
        if self.model.dtype in ("bfloat16", "float16") and self.scaling.gpus_per_worker == 0:
            raise ValueError(f"model.dtype: {self.model.dtype} training on CPU is not supported; "
                             "use 'auto' or 'float32'")
        method = methods.get(self.method.objective)
        if self.data.format not in method.formats:
            takers = [m for m in methods.names() if self.data.format in methods.get(m).formats]
            raise ValueError(f"data.format: method.objective {method.name} trains on "
                             f"{' or '.join(method.formats)}, not {self.data.format} (which "
                             f"{' or '.join(takers) or 'no method'} trains on)")
        if self.memory.mixed_precision and self.model.dtype in ("bfloat16", "float16"):
            raise ValueError("memory.mixed_precision keeps fp32 master weights: model.dtype must "
                             f"be auto or float32, not {self.model.dtype}")
        if self.memory.cpu_offload and self.scaling.strategy != "fsdp":
            raise ValueError("memory.cpu_offload needs scaling.strategy: fsdp")
        if self.data.eval_files and self.data.eval_fraction:
            raise ValueError("data: give data.eval_files or data.eval_fraction, not both")
        return self

    @property
    def on_gpu(self) -> bool:
        return self.scaling.gpus_per_worker > 0

    @property
    def activation_checkpointing(self) -> bool:
        """memory.activation_checkpointing with its default resolved."""
        setting = self.memory.activation_checkpointing
        return self.on_gpu if setting is None else setting

    @property
    def mixed_precision(self) -> bool:
        """memory.mixed_precision with its default resolved."""
        setting = self.memory.mixed_precision
        if setting is None:
            return self.on_gpu and self.method.type == "full" and self.model.dtype == "auto"
        return setting

    @property
    def entry_name(self) -> str:
        return self.output.name or self.name


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply dotted `key=value` overrides, and validate it."""
    raw = read_mapping(path, "recipe")
    for item in overrides:
        apply_override(raw, item, Recipe)
    return validate(Recipe, raw, source=str(path))


