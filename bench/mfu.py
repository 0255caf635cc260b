"""MFU of attune's plain training loop on one GPU: a ~1.1B-parameter Llama in bf16, no Ray.

    PYTHONPATH=platform python bench/mfu.py [--layers 22] [--steps 30] [--compile]

FLOPs per token = 6 N + 12 L H S (N parameters, L layers, H hidden size, S sequence length:
the matmuls forward and backward plus attention scores). MFU = achieved FLOP/s / dense bf16 peak
(989 TFLOP/s on H100/H200 SXM). Random weights and tokens: MFU does not depend on them.
Writes bench/results/mfu.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from attune.recipe import Recipe
from attune.loop import Loop, train_loop


def build_model(out: Path, layers: int, device: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    # TinyLlama-1.1B's shape
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                         max_position_embeddings=4096, torch_dtype="bfloat16")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


def random_batches(batch: int, seq: int, vocab: int = 32000):
    def batches(epoch: int):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(1000):
            ids = torch.randint(0, vocab, (batch, seq), generator=g)
            yield {"input_ids": ids, "labels": ids, "num_tokens": torch.full((batch,), seq),
                   "position_ids": torch.arange(seq).expand(batch, seq)}
    return batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu only for a dry run of the script")
    parser.add_argument("--out", default="bench/results/mfu.json")
    args = parser.parse_args()

    model_dir = Path(tempfile.mkdtemp()) / "llama-1b"
    params = build_model(model_dir, args.layers, args.device)
    recipe = Recipe.model_validate({
        "name": "mfu", "model": {"name_or_path": str(model_dir), "dtype": "bfloat16",
                                 "compile": args.compile},
        "data": {"max_seq_len": args.seq},
        "optim": {"max_steps": args.steps, "warmup_steps": 1, "micro_batch_size": args.batch},
        "scaling": {"num_workers": 1, "gpus_per_worker": 1},
        "eval": {"every_steps": 10, "log_every_steps": 10},
        "checkpoint": {"every_steps": 10_000},
    })
    reports = []
    start = time.perf_counter()
    train_loop(recipe, str(model_dir), Loop(
        train_batches=random_batches(args.batch, args.seq), steps_per_epoch=1000,
        report=lambda metrics, ckpt: reports.append(metrics), checkpoint_root=None,
        device=torch.device(args.device)))
    steady = reports[1:] or reports  # the first window holds start-up (and compilation)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "params": params,
        "layers": args.layers, "batch": args.batch, "seq": args.seq, "compile": args.compile,
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "mfu": sum(r.get("mfu", 0) for r in steady) / len(steady),
        "windows": [{k: r.get(k) for k in ("step", "tokens_per_s", "mfu")} for r in reports],
        "wall_s": time.perf_counter() - start,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
