"""MFU and peak memory of attune's plain training loop on one GPU, no Ray: a Llama-3.2-1B-shaped
full fine-tune and a Llama-3.1-8B-shaped LoRA fine-tune, random weights, packed rows.

    PYTHONPATH=platform python bench/mfu.py --shape 1b --method full --compile
    PYTHONPATH=platform python bench/mfu.py --shape 8b --method lora --compile
    PYTHONPATH=platform python bench/mfu.py --shape 1b --layers 1 --device cpu --steps 2   # dry run

The recipe's GPU defaults apply: activation checkpointing per layer, the chunked loss, and for
full fine-tuning fp32 master weights under bf16 compute; `--plain` turns the memory settings off
(a baseline measured the same way). Rows are packed: documents of random lengths whose positions
restart, as `data.pack` makes them, so attention runs per document (flash-attn's variable-length
kernel where it is installed, else SDPA with a block mask).

FLOPs per token = 2N forward + 2N backward through the activations + 2N' for the weight gradients
(N' the trainable parameters: N for full fine-tuning, the adapters for LoRA) + 12·L·H·S for the
attention scores; recomputation under activation checkpointing is not counted (MFU, not HFU).
MFU = achieved FLOP/s / dense bf16 peak (989 TFLOP/s on H100/H200 SXM). Peak memory is
torch.cuda.max_memory_allocated, beside the memory plan's estimate for the same recipe.
Writes bench/results/mfu-<shape>-<method>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from attune.recipe import Recipe
from attune.train.loop import Loop, train_loop
from attune.train.tokenizing import IGNORE

SHAPES = {
    # Llama-3.2-1B: tied embeddings, 128k vocabulary
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    # Llama-3.1-8B
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def build_model(out: Path, shape: dict, device: str) -> int:
    """Random weights in bf16, saved where the loop loads its base model from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0,
                         torch_dtype="bfloat16")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def packed_batches(batch: int, seq: int, vocab: int):
    """Rows of documents of random lengths (64 to seq/2 tokens), positions restarting per
    document, each document's first token unlabelled, as `attune.data.pack` makes them."""
    def batches(epoch: int):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(1000):
            ids = torch.randint(0, vocab, (batch, seq), generator=g)
            positions = torch.empty_like(ids)
            labels = ids.clone()
            for row in range(batch):
                start = 0
                while start < seq:
                    n = min(int(torch.randint(64, seq // 2, (1,), generator=g)), seq - start)
                    positions[row, start:start + n] = torch.arange(n)
                    labels[row, start] = IGNORE
                    start += n
            yield {"input_ids": ids, "labels": labels, "position_ids": positions,
                   "num_tokens": torch.full((batch,), seq)}
    return batches


def planned_gib(recipe: Recipe, model_dir: Path) -> float | None:
    """The memory plan's per-device total for this recipe, where attune has the plan."""
    try:
        from attune.train.memory_plan import plan_recipe
    except ImportError:
        return None
    return plan_recipe(recipe, str(model_dir)).total_bytes / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--layers", type=int, help="fewer layers than the shape's (dry runs)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--plain", action="store_true",
                        help="memory settings off: no checkpointing, whole logits, pure bf16")
    parser.add_argument("--device", default="cuda", help="cpu only for a dry run of the script")
    parser.add_argument("--out", help="default: bench/results/mfu-<shape>-<method>.json")
    args = parser.parse_args()

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    model_dir = Path(tempfile.mkdtemp()) / f"llama-{args.shape}"
    params = build_model(model_dir, shape, args.device)
    on_gpu = args.device == "cuda"
    memory = ({"activation_checkpointing": False, "loss_chunk_tokens": None,
               "mixed_precision": False} if args.plain else {})
    recipe = Recipe.model_validate({
        "name": "mfu", "model": {"name_or_path": str(model_dir), "compile": args.compile,
                                 "dtype": "bfloat16" if args.plain and on_gpu else "auto"},
        "method": {"type": args.method},
        "data": {"max_seq_len": args.seq},
        "optim": {"max_steps": args.steps, "warmup_steps": 1, "micro_batch_size": args.batch},
        "scaling": {"num_workers": 1, "gpus_per_worker": 1 if on_gpu else 0},
        "memory": memory,
        "eval": {"every_steps": 10, "log_every_steps": 10},
        "checkpoint": {"every_steps": 10_000},
    })
    reports = []
    start = time.perf_counter()
    train_loop(recipe, str(model_dir), Loop(
        train_batches=packed_batches(args.batch, args.seq, shape["vocab_size"]),
        steps_per_epoch=1000, report=lambda metrics, ckpt: reports.append(metrics),
        checkpoint_root=None, device=torch.device(args.device)))
    steady = reports[1:] or reports  # the first window holds start-up (and compilation)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    planned = planned_gib(recipe, model_dir)
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__, "shape": args.shape, "method": args.method,
        "params": params, "layers": shape["num_hidden_layers"], "batch": args.batch,
        "seq": args.seq, "compile": args.compile, "plain": args.plain,
        "activation_checkpointing": recipe.activation_checkpointing,
        "mixed_precision": recipe.mixed_precision,
        "loss_chunk_tokens": recipe.memory.loss_chunk_tokens,
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "mfu": sum(r.get("mfu", 0) for r in steady) / len(steady),
        "windows": [{k: r.get(k) for k in ("step", "loss", "tokens_per_s", "mfu")}
                    for r in reports],
        "wall_s": time.perf_counter() - start,
        "peak_memory_gib": peak,
        "planned_memory_gib": planned,
        "plan_over_measured": planned / peak if planned and peak else None,
    }
    out = Path(args.out or f"bench/results/mfu-{args.shape}-{args.method}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
