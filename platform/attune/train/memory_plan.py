"""The memory plan: what one training worker's device will hold, from the model's config alone
(built on the meta device, no weights) and the recipe, before any cluster work.

    plan = plan_recipe(recipe, model_dir, device_memory_gib=80)
    print(format_plan(plan)); plan.fits; plan.suggestions

Per device, in bytes (N parameters, N' trainable, W = scaling.num_workers, S = W under FSDP
else 1; p = bytes of the stored dtype, c = of the compute dtype; T = micro_batch x max_seq_len):
  parameters     N·p/S (LoRA: the frozen base plus the adapters, r·(in+out) per target)
  gradients      N'·p/S;  DDP's gradient buckets N'·p more (W > 1)
  optimizer      AdamW's two states, 2·N'·p/S
  gathered       FSDP: the root unit (embeddings, output layer, final norm, kept all step) and
                 two decoder layers (one prefetched) unsharded in c; DDP + mixed: a c copy of all
  activations    T·L·A per layer, A = 2(4h + 2c·h) + c(2q + 2kv + 4i) + 4·heads;
                 checkpointed: T·L·c·h kept + one layer's T·A recomputed; + mask, final norm
  logits         T·V·(c + 8) (the logits, fp32 log-probs, their gradient); chunked: K·V·(c + 12)
                 + the labelled hidden states T·h·c
  the method's   its own terms (attune.train.methods): DPO's frozen reference copy, N·p/S under
                 full fine-tuning; T counts each example's sequences (DPO: chosen and rejected)
peak = parameters + optimizer + buckets + gathered + max(gradients, activations + logits): the
backward pass frees activations as gradients appear; checkpointed, the logits' backward is done
before the first layer is recomputed, so that layer's T·A and the logits count once, the larger.
docs/memory.md derives each term;
`memory.cpu_offload` moves parameters, gradients and optimizer states to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from attune import modeling
from attune.config import apply_override, validate
from attune.recipe import Recipe
from attune.train import methods

GiB = 2**30
# What a GPU holds beyond tensors (CUDA context, NCCL buffers, the caching allocator's slack).
GPU_RESERVE = 0.10
WORKER_COUNTS = (2, 4, 8, 16, 32, 64, 128, 256, 512)


_OVERLAPPING = ("gradients", "activations", "logits")


@dataclass(frozen=True)
class Shape:
    """The model's dimensions and parameter counts (from its config on the meta device)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # all of them
    layer_params: int  # one decoder layer
    linear_io: dict[str, int]  # linear layers' name (q_proj, ...) -> summed in + out features

    def lora_params(self, recipe: Recipe) -> int:
        """The adapters of the recipe's target modules, r·(in + out) each (0 for full)."""
        if recipe.method.type != "lora":
            return 0
        return recipe.method.rank * sum(self.linear_io.get(t, 0) for t in recipe.method.target_modules)


@dataclass(frozen=True)
class Sizes:
    """Bytes per value as stored and as computed in, and how many ways the state is sharded."""
    stored: int
    compute: int
    shards: int


@dataclass
class Plan:
    terms: dict[str, int]  # name -> bytes on each worker's device
    host: dict[str, int]  # what cpu_offload keeps in each worker's host memory instead
    device_bytes: int | None  # usable device memory; None: unknown, not checked
    device_source: str  # where the device memory came from
    serving: dict[str, int]  # bf16 weights and KV cache figures, for `attune serve`
    shape: Shape
    recomputed_layer: int = 0  # checkpointed: the layer recomputed inside `activations`
    notes: list[str] = field(default_factory=list)
    # changes that fit: (overrides, device bytes, host bytes)
    suggestions: list[tuple[list[str], int, int]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """The peak: gradients grow in the backward pass as the activations and logits are
        freed, so it counts the larger of the two, plus everything else."""
        t = self.terms
        forward = t["activations"] + t["logits"] - min(self.recomputed_layer, t["logits"])
        overlapping = max(t.get("gradients", 0), forward)
        return sum(v for k, v in t.items() if k not in _OVERLAPPING) + overlapping

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total_bytes <= self.device_bytes


def model_shape(config) -> Shape:
    """Dimensions from the config; parameter counts from the model built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    layer = max((sum(p.numel() for p in m.parameters()) for m in model.modules()
                 if type(m).__name__ in blocks), default=0)
    linear_io: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            suffix = name.rsplit(".", 1)[-1]
            linear_io[suffix] = linear_io.get(suffix, 0) + m.in_features + m.out_features
    heads = config.num_attention_heads
    return Shape(hidden=config.hidden_size, intermediate=config.intermediate_size,
                 layers=config.num_hidden_layers, heads=heads,
                 kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                 vocab=config.vocab_size, params=sum(p.numel() for p in model.parameters()),
                 layer_params=layer, linear_io=linear_io)


def plan(shape: Shape, recipe: Recipe, device_memory_gib: float | None = None,
         device_source: str = "scaling.device_memory_gib") -> Plan:
    """The per-device terms of one training worker (a pure function of shape and recipe)."""
    sc, mem, on_gpu = recipe.scaling, recipe.memory, recipe.on_gpu
    mixed = recipe.mixed_precision
    stored = 4 if mixed or recipe.model.dtype == "float32" or (
        recipe.model.dtype == "auto" and not on_gpu) else 2
    compute = 2 if mixed else stored
    fsdp = sc.strategy == "fsdp"  # Ray Train's workers run distributed, even one alone
    shards = sc.num_workers if fsdp else 1
    lora = recipe.method.type == "lora"
    adapters = shape.lora_params(recipe)
    trainable = adapters if lora else shape.params
    params = (shape.params + adapters) * stored
    terms: dict[str, int] = {}
    state = {"parameters": params // shards, "gradients": trainable * stored // shards,
             "optimizer states": 2 * trainable * stored // shards}
    host: dict[str, int] = {}
    if mem.cpu_offload and fsdp:
        host = state
    else:
        terms.update(state)
    if sc.strategy == "ddp" and sc.num_workers > 1:
        terms["DDP gradient buckets"] = trainable * stored
    if fsdp:
        root = shape.params - shape.layers * shape.layer_params
        terms["gathered units"] = (root + min(2, shape.layers) * shape.layer_params) * compute
    elif mixed:  # autocast's bf16 copy of every weight, cached for the whole forward and backward
        terms["gathered units"] = shape.params * compute
    terms["activations"] = activation_bytes(shape, recipe, compute)
    terms["logits"] = logit_bytes(shape, recipe, compute)
    terms.update(methods.get(recipe.method.objective).memory_terms(
        shape, recipe, Sizes(stored, compute, shards)))
    total_tokens = recipe.data.max_seq_len
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
    serving = {"weights (bf16)": shape.params * 2,
               "KV cache per token": kv_per_token,
               f"KV cache, 1 x {total_tokens} tokens": kv_per_token * total_tokens,
               f"KV cache, 16 x {total_tokens} tokens": 16 * kv_per_token * total_tokens}
    usable = None
    if device_memory_gib is not None:
        usable = int(device_memory_gib * GiB * ((1 - GPU_RESERVE) if on_gpu else 1))
    notes = []
    if usable is None:
        notes.append("device memory unknown, not checked: " + (
            "set scaling.device_memory_gib=<GiB> (`attune train` asks the cluster)"
            if device_source == "scaling.device_memory_gib" else device_source))
    recomputed = recomputed_layer_bytes(shape, recipe, compute) if recipe.activation_checkpointing else 0
    return Plan(terms, host, usable, device_source, serving, shape, recomputed, notes)


def rows_per_micro_batch(recipe: Recipe) -> int:
    """Sequences one micro-batch puts through the model (a DPO pair is two)."""
    return recipe.optim.micro_batch_size * methods.get(recipe.method.objective).sequences_per_example(recipe)


def packed_mask(recipe: Recipe) -> bool:
    """Whether rows hold several examples that SDPA keeps apart with a block mask."""
    return (recipe.data.packing and methods.get(recipe.method.objective).packs
            and recipe.model.attn_implementation != "flash_attention_2")


def layer_bytes_per_token(shape: Shape, recipe: Recipe, c: int) -> int:
    """What one decoder layer keeps for the backward, per token (A in the docstring)."""
    h, i, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    # SDPA with the packed rows' mask repeats k and v to every query head (transformers'
    # repeat_kv); flash-attention takes the kv heads as they are.
    kv = q if packed_mask(recipe) else shape.kv_heads * shape.head_dim
    norm = 4 * h + 2 * c * h  # RMSNorm: its fp32 input, the normalised and the scaled output
    return 2 * norm + c * (2 * q + 2 * kv + 4 * i) + 4 * shape.heads


def recomputed_layer_bytes(shape: Shape, recipe: Recipe, c: int) -> int:
    return rows_per_micro_batch(recipe) * recipe.data.max_seq_len * layer_bytes_per_token(shape, recipe, c)


def activation_bytes(shape: Shape, recipe: Recipe, c: int) -> int:
    """What the forward pass keeps for the backward, per micro-batch (docs/memory.md)."""
    h = shape.hidden
    tokens = rows_per_micro_batch(recipe) * recipe.data.max_seq_len
    per_layer = layer_bytes_per_token(shape, recipe, c)
    norm = 4 * h + 2 * c * h  # the final norm
    if recipe.activation_checkpointing:
        layers = tokens * (shape.layers * c * h + per_layer)
    else:
        layers = tokens * shape.layers * per_layer
    mask = 0
    if packed_mask(recipe):
        mask = rows_per_micro_batch(recipe) * recipe.data.max_seq_len ** 2 * c
    return layers + tokens * norm + mask


def logit_bytes(shape: Shape, recipe: Recipe, c: int) -> int:
    tokens = rows_per_micro_batch(recipe) * recipe.data.max_seq_len
    chunk = recipe.memory.loss_chunk_tokens
    if chunk is None:
        return tokens * shape.vocab * (c + 8)
    return min(chunk, tokens) * shape.vocab * (c + 12) + tokens * shape.hidden * c


# --- suggestions: changes that make a plan fit, each checked by planning again ---------------

def suggest(shape: Shape, recipe: Recipe, device_memory_gib: float, limit: int = 6
            ) -> list[tuple[list[str], int, int]]:
    """Changes that fit, as (overrides, device bytes, host bytes), each planned again: from
    each family of changes its first that fits, skipping any that contain a smaller one that
    does. More workers only where they bring devices of their own (GPUs, or the recipe's
    device memory)."""
    fitting: list[tuple[list[str], int, int]] = []
    for family in _families(recipe):
        for overrides in family:
            if any(set(found) <= set(overrides) for found, _, _ in fitting):
                break  # a smaller change already fits
            try:
                changed = with_overrides(recipe, overrides)
            except ValueError:  # an impossible combination for this recipe
                continue
            p = plan(shape, changed, device_memory_gib)
            if p.fits:
                fitting.append((overrides, p.total_bytes, sum(p.host.values())))
                break
    return fitting[:limit]


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    raw = recipe.model_dump()
    for item in overrides:
        apply_override(raw, item, Recipe)
    return validate(Recipe, raw, source="memory plan")


def _families(recipe: Recipe) -> list[list[list[str]]]:
    """Families of changes, each ordered from the mildest."""
    sc, o, mem = recipe.scaling, recipe.optim, recipe.memory
    savers = []
    if not recipe.activation_checkpointing:
        savers.append("memory.activation_checkpointing=true")
    if mem.loss_chunk_tokens is None:
        savers.append("memory.loss_chunk_tokens=1024")
    # a smaller micro-batch, the same tokens per step
    smaller = [[f"optim.micro_batch_size={m}",
                f"optim.grad_accum_steps={o.grad_accum_steps * o.micro_batch_size // m}"]
               for m in sorted({o.micro_batch_size // 2, 1}, reverse=True) if 1 <= m < o.micro_batch_size]
    lora = ["method.type=lora"] if recipe.method.type == "full" else []
    fsdp = ["scaling.strategy=fsdp"] if sc.strategy == "ddp" else []
    offload = [] if mem.cpu_offload else [*fsdp, "memory.cpu_offload=true"]
    counts = [n for n in WORKER_COUNTS if n > sc.num_workers]
    if not (recipe.on_gpu or sc.device_memory_gib is not None):
        counts = []  # CPU workers of one node share its memory: more of them bring none
    everything = [*savers, *(smaller[-1] if smaller else [])]
    families = [[[s]] for s in savers] + [smaller]
    families += [[lora]] if lora else []
    families += [[fsdp]] if fsdp and sc.num_workers > 1 else []
    families += [[offload]] if offload else []
    families += [[[*change, *fsdp, f"scaling.num_workers={n}"] for n in counts]
                 for change in ([], lora)]
    families += [[[*lora, *offload]]] if lora and offload else []
    families += [[[*change, *everything]] for change in ([], lora, offload, [*lora, *offload])
                 if everything]
    return [f for f in families if f and all(f)]


# --- the table -------------------------------------------------------------------------------

def format_plan(p: Plan, recipe: Recipe) -> str:
    sc, shape, adapters = recipe.scaling, p.shape, p.shape.lora_params(recipe)
    unit, scale = ("GiB", GiB) if p.total_bytes >= GiB else ("MiB", 2**20)
    lines = [f"memory plan: {recipe.name}: {_count(shape.params)} parameters"
             + (f" + {_count(adapters)} LoRA" if adapters else "")
             + f", {recipe.method.type}, {sc.strategy} over {sc.num_workers} worker(s), "
             f"micro-batch {recipe.optim.micro_batch_size} x {recipe.data.max_seq_len} tokens",
             f"  {'per device':<24}{unit:>9}"]
    lines += [f"  {name:<24}{n / scale:>9.2f}" for name, n in p.terms.items()]
    lines.append(f"  {'peak':<24}{p.total_bytes / scale:>9.2f}   (counts the larger of "
                 "gradients and activations + logits)")
    if p.host:
        lines.append(f"  in host memory (cpu_offload): {size(sum(p.host.values()))} a worker")
    if p.device_bytes is not None:
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(f"  device: {size(p.device_bytes)} usable ({p.device_source}): {verdict}")
    lines += [f"  {note}" for note in p.notes]
    lines.append("  serving: " + ", ".join(f"{k} {size(v)}" for k, v in p.serving.items()))
    if p.suggestions:
        lines.append("  changes that fit (each planned again):")
        lines += [f"    {' '.join(o)}  -> {size(t)}" + (
            f" (+ {size(host)} of host memory a worker)" if host else "")
            for o, t, host in p.suggestions]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def size(n: int) -> str:
    if n >= GiB / 10:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def plan_recipe(recipe: Recipe, model_dir: str | None = None,
                device_memory_gib: float | None = None,
                device_source: str = "scaling.device_memory_gib") -> Plan:
    """The plan of a recipe, with changes that fit where it does not (the model's config read
    from `model_dir`, else from the recipe's model); device memory: the argument, else the
    recipe's scaling.device_memory_gib, else unknown (not checked)."""
    shape = model_shape(modeling.model_config(model_dir or recipe.model.name_or_path))
    memory = device_memory_gib or recipe.scaling.device_memory_gib
    p = plan(shape, recipe, memory, device_source)
    if p.fits is False:
        p.suggestions = suggest(shape, recipe, memory)
    return p
