"""The memory plan beside the memory measured: a few steps of attune's plain training loop on
CPU (no Ray, one process), for the tiny model and a ~100M-parameter Llama shape, for each
method (SFT and DPO, full and LoRA).

    PYTHONPATH=platform python bench/memory_plan.py                       # both, ~1 min
    PYTHONPATH=platform python bench/memory_plan.py --shape tiny --out /tmp/tiny.json

Measured: the peak of the bytes torch's CPU allocator holds from loading the model to the last
step, summed from torch.profiler's allocation events in time order (profile_memory=True): the
tensors only, as the plan counts them, not the interpreter, libraries or allocator caches. Each
shape is measured in a subprocess of its own, so one's tensors never count in another's peak.
Writes bench/results/memory_plan.json: per shape, method and setting, planned, measured,
plan/measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attune.modeling import ensure_tiny_llama
from attune.recipe import Recipe
from attune.train.memory_plan import plan_recipe
from attune.train.memory_profile import measured_peak_bytes
from attune.train.tokenizing import IGNORE

# ~100M parameters: Llama-shaped, GQA (12 query heads, 4 kv heads), an untied 16k vocabulary.
SHAPE_100M = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024)
SETTINGS = {  # name -> memory section: the CPU defaults, then the savers on
    "plain": {"activation_checkpointing": False, "loss_chunk_tokens": None},
    "checkpointing+chunked": {"activation_checkpointing": True, "loss_chunk_tokens": 256},
}
SHAPES = ("tiny", "100m")
METHODS = {  # name -> method section (and the data format it trains on)
    "sft-full": ({"type": "full"}, "messages"),
    "sft-lora": ({"type": "lora"}, "messages"),
    "dpo-full": ({"type": "full", "objective": "dpo"}, "preference"),
    "dpo-lora": ({"type": "lora", "objective": "dpo"}, "preference"),
}


def recipe_for(base: str, method: str, memory: dict, steps: int, micro: int, seq: int) -> Recipe:
    section, data_format = METHODS[method]
    return Recipe.model_validate({
        "name": "memory-plan", "model": {"name_or_path": base}, "method": section,
        "data": {"max_seq_len": seq, "format": data_format},
        "optim": {"max_steps": steps, "warmup_steps": 0, "micro_batch_size": micro},
        "scaling": {"num_workers": 1}, "memory": memory,
        "checkpoint": {"every_steps": 1000}, "eval": {"every_steps": 1000}})


def packed_batch(vocab: int, micro: int, seq: int) -> dict:
    """Rows of two documents each (positions restart), as attune.train.rows packs them."""
    ids = torch.randint(0, vocab, (micro, seq), generator=torch.Generator().manual_seed(0))
    half = seq // 2
    positions = torch.cat([torch.arange(half), torch.arange(seq - half)]).expand(micro, seq)
    labels = ids.clone()
    labels[:, 0] = labels[:, half] = IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": positions.contiguous(),
            "num_tokens": torch.full((micro,), seq)}


def pair_batch(vocab: int, micro: int, seq: int) -> dict:
    """Preference pairs as the DPO method makes them: a chosen and a rejected row each, padded,
    labelled on the answer (the second half of the row)."""
    generator = torch.Generator().manual_seed(0)
    batch = {"num_tokens": torch.full((micro,), 2 * seq)}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, vocab, (micro, seq), generator=generator)
        labels = ids.clone()
        labels[:, : seq // 2] = IGNORE
        batch |= {f"{side}_input_ids": ids, f"{side}_labels": labels}
    return batch


def measured_peak(recipe: Recipe, base: str, vocab: int) -> int:
    make = pair_batch if recipe.data.format == "preference" else packed_batch
    batch = make(vocab, recipe.optim.micro_batch_size, recipe.data.max_seq_len)
    return measured_peak_bytes(recipe, base, batch)


def measure_shape(shape: str, methods: list[str], settings: list[str], steps: int, micro: int,
                  seq: int) -> list[dict]:
    """Every setting of one shape, in this process."""
    if shape == "tiny":
        base = str(ensure_tiny_llama())
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = str(Path(tempfile.mkdtemp()) / "llama-100m")
        LlamaForCausalLM(LlamaConfig(**SHAPE_100M)).save_pretrained(base)
    rows = []
    for method in methods:
        for name in settings:
            recipe = recipe_for(base, method, SETTINGS[name], steps, micro, seq)
            plan = plan_recipe(recipe, base)
            peak = measured_peak(recipe, base, plan.shape.vocab)
            rows.append({"shape": shape, "method": method, "setting": name,
                         "params": plan.shape.params,
                         "micro_batch": micro, "seq": seq, "steps": steps,
                         "planned_mib": round(plan.total_bytes / 2**20, 2),
                         "measured_mib": round(peak / 2**20, 2),
                         "plan_over_measured": round(plan.total_bytes / peak, 3),
                         "terms_mib": {k: round(v / 2**20, 2) for k, v in plan.terms.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, action="append",
                        help="default: every shape, each in a subprocess of its own")
    parser.add_argument("--method", choices=METHODS, action="append", help="default: every one")
    parser.add_argument("--setting", choices=SETTINGS, action="append", help="default: both")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", default="bench/results/memory_plan.json")
    args = parser.parse_args()
    if args.shape and len(args.shape) == 1:
        rows = measure_shape(args.shape[0], args.method or list(METHODS),
                             args.setting or list(SETTINGS), args.steps, args.micro, args.seq)
    else:
        rows = []
        for shape in args.shape or SHAPES:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, __file__, "--shape", shape, "--out", out.name,
                                f"--steps={args.steps}", f"--micro={args.micro}",
                                f"--seq={args.seq}",
                                *[f"--setting={s}" for s in args.setting or ()],
                                *[f"--method={m}" for m in args.method or ()]], check=True,
                               env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                                   "OMP_NUM_THREADS", "2")})
                rows += json.loads(Path(out.name).read_text())["rows"]
    result = {"device": "cpu", "torch": torch.__version__,
              "method": "peak of torch's CPU allocator (torch.profiler allocation events)",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['shape']:>5} {r['method']:<9} {r['setting']:<22} planned {r['planned_mib']:>8.1f} MiB  "
              f"measured {r['measured_mib']:>8.1f} MiB  plan/measured {r['plan_over_measured']:.2f}")


if __name__ == "__main__":
    main()
