"""Rollouts benchmark (GRPO): attune's engines against vLLM's own `LLM.generate`, and weight sync.

    PYTHONPATH=platform .venv/bin/python bench/rollouts.py [--rounds 4] [--grpo-steps 20 --sft <entry>]
    PYTHONPATH=platform python bench/rollouts.py --gpu --model <hf dir of a ~1B model>   (one GPU)

1. Completion tokens/s of one batch of every bundled prompt (data/transformer_qa_prompts.jsonl,
   rendered with the model's chat template as GRPO's `prompt_row` does), n completions each,
   (a) `vllm.LLM(...).generate` in this process and (b) attune's path: `start_engines` +
   `Rollouts.generate` through the engine's Ray actor (embedded Ray). The same settings on both:
   the engine's arguments (`RolloutEngine`), ENGINE_ENV, the seed, the sampling settings with
   `logprobs=0` (GRPO needs them, so (a) asks for them too), fp32 on CPU / bf16 on CUDA, and
   the engine's torch threads: the actor's (Ray's OMP_NUM_THREADS from its one CPU) on both
   sides unless `--vllm-default-threads`.
   Pairs in alternating order (a b, b a, ...) after a warm-up batch each; the figure is the
   median over the pairs of b / a, with the lowest and highest.
2. Weight sync: the model's full weights through `Rollouts.sync` (the object store into the
   engine's `reload_weights`), seconds per GB over a few syncs.
3. With `--grpo-steps N --sft <tiny-full entry>`: `fine_tune` of recipes/tiny-grpo.yaml for N
   steps; the step's split (time/rollout_s, time/update_s, time/sync_s of every even step, from
   the history) and the sync's share of the step.
Writes bench/results/rollouts.json (--gpu: rollouts-gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

# Before torch and vLLM load: this process's engine gets the environment the actors get.
from attune.train.rollouts import ENGINE_ENV  # noqa: E402

ENGINE_CPUS = 1
os.environ.update(ENGINE_ENV)

import ray  # noqa: E402
import torch  # noqa: E402

from attune import modeling  # noqa: E402
from attune.cluster import ensure_ray  # noqa: E402
from attune.train.methods.grpo import prompt_row  # noqa: E402
from attune.train.records import read_records  # noqa: E402
from attune.train.rollouts import EngineSpec, Rollouts, start_engines, stop_engines  # noqa: E402

PROMPTS = ROOT / "data/transformer_qa_prompts.jsonl"
MAX_MODEL_LEN = 512


def load_prompts(model: str) -> list[list[int]]:
    tokenizer = modeling.load_tokenizer(model)
    rows = [prompt_row(r, tokenizer, MAX_MODEL_LEN) for r in read_records([str(PROMPTS)], "prompts")]
    return [row["prompt_ids"][:row["prompt_len"]].tolist() for row in rows]


def vllm_side(model: str, dtype: str, gpu: bool, seed: int, threads: int | None):
    """(a) vLLM's offline engine in this process, with RolloutEngine's arguments."""
    from vllm import LLM, SamplingParams

    if threads:
        # As the actor has them (Ray's OMP_NUM_THREADS, its CPUs). vLLM's own reduction to one
        # thread does not happen in-process on CPU: its CPU worker has by then made
        # torch.set_num_threads a no-op, so the engine keeps one thread per core.
        torch.set_num_threads(threads)
    llm = LLM(model=model, dtype=dtype, max_model_len=MAX_MODEL_LEN, seed=seed, enforce_eager=True,
              generation_config="auto", disable_log_stats=True,
              **({"gpu_memory_utilization": 0.3} if gpu else {}))

    def generate(prompts, **sampling) -> int:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(logprobs=0, **sampling), use_tqdm=False)
        return sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return generate


def attune_side(engines):
    """(b) attune's engine actor through the trainer's client."""
    rollouts = Rollouts(engines)

    def generate(prompts, **sampling) -> int:
        return sum(len(c.token_ids) for group in rollouts.generate(prompts, **sampling) for c in group)
    return generate


def tokens_per_s(generate, prompts, sampling) -> tuple[float, int, float]:
    start = time.perf_counter()
    tokens = generate(prompts, **sampling)
    seconds = time.perf_counter() - start
    return tokens / seconds, tokens, seconds


def compare(sides: dict, prompts, sampling, rounds: int) -> dict:
    for generate in sides.values():  # warm-up: first-batch costs (allocations, kernels)
        generate(prompts[:8], **sampling)
    runs = {side: [] for side in sides}
    load = []
    for i in range(rounds):
        for side in (["vllm", "attune"] if i % 2 == 0 else ["attune", "vllm"]):
            rate, tokens, seconds = tokens_per_s(sides[side], prompts, sampling)
            runs[side].append({"tokens_per_s": rate, "tokens": tokens, "seconds": seconds})
            print(f"round {i} {side}: {tokens} tokens in {seconds:.2f} s = {rate:.0f} tokens/s", flush=True)
        load.append(os.getloadavg()[0])
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs["vllm"], runs["attune"])]
    return {"runs": runs, "ratios": ratios, "ratio_attune_over_vllm": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "load_average_1min_after_each_round": load}


def sync_seconds_per_gb(engines, model: str, dtype: torch.dtype, syncs: int) -> dict:
    """Full weights, on CPU as the trainer hands them over, through `Rollouts.sync`."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    weights = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    gb = sum(v.numel() * v.element_size() for v in weights.values()) / 1e9
    rollouts = Rollouts(engines)
    times = []
    for version in range(1, syncs + 1):
        start = time.perf_counter()
        rollouts.sync(weights, version=version)
        times.append(time.perf_counter() - start)
    return {"gb": gb, "seconds": times, "seconds_per_gb": statistics.median(times) / gb}


def wider_model(base: str, out: Path, hidden: int, layers: int) -> str:
    """The tiny model's tokenizer on a wider, deeper Llama of random weights: a sync of
    hundreds of MB, where the tiny model's 9 MB measure mostly the fixed cost of a call."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.intermediate_size, config.num_attention_heads = 4 * hidden, hidden // 64
    config.num_key_value_heads = hidden // 64
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in Path(base).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    return str(out)


def grpo_split(sft_entry: str, steps: int) -> dict:
    """`fine_tune` of the tiny GRPO recipe; the step's time split from the history. A step's
    split runs from the end of the step before it, so an evaluation or a report lands in the
    next step's: the history (written at evaluations) holds every even step, evaluated on one
    prompt, and each of them follows an odd step with neither."""
    from attune.recipe import load_recipe
    from attune.train.trainer import fine_tune

    eval_file = Path(os.environ["ATTUNE_HOME"]) / "one-prompt.jsonl"
    eval_file.write_text(PROMPTS.read_text().splitlines()[0] + "\n")
    recipe = load_recipe(str(ROOT / "recipes/tiny-grpo.yaml"), [
        f"name=bench-grpo-{time.time_ns()}", f"model.name_or_path={sft_entry}",
        f"optim.max_steps={steps}", "eval.every_steps=2", "eval.log_every_steps=2",
        f"data.eval_files=[{eval_file}]", "data.eval_fraction=0", f"checkpoint.every_steps={steps}"])
    entry = fine_tune(recipe)
    meta = json.loads((Path(entry) / "attune.json").read_text())
    history = [h for h in meta["history"] if h.get("step", 0) % 2 == 0 and h.get("step", 0) > 0]
    total = {k: sum(h[f"time/{k}_s"] for h in history) for k in ("rollout", "update", "sync")}
    params = sum(v.numel() for v in _safetensors(sft_entry).values())
    gb = params * 4 / 1e9  # fp32, the recipe's dtype on CPU
    per_step_sync = total["sync"] / len(history)
    return {"steps": steps, "steps_measured": [h["step"] for h in history], "seconds_total": total,
            "sync_share": total["sync"] / sum(total.values()),
            "sync_s_per_step": per_step_sync, "params": params, "gb_per_sync": gb,
            "sync_seconds_per_gb": per_step_sync / gb,
            "per_step": [{k: h[k] for k in ("step", "time/rollout_s", "time/update_s", "time/sync_s",
                                            "completion_tokens", "rollout_tokens_per_s")}
                         for h in history]}


def _safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4, help="pairs of (a) vLLM and (b) attune batches")
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--syncs", type=int, default=5, help="weight syncs timed")
    parser.add_argument("--wide", default="1024x8", help="HIDDENxLAYERS of the wider model whose "
                        "sync is also timed on CPU ('' for none)")
    parser.add_argument("--vllm-default-threads", action="store_true", help="leave (a) at the "
                        "threads vLLM gives itself in-process (one per core) instead of the actor's")
    parser.add_argument("--model", help="a Hugging Face model dir (default: the tiny model)")
    parser.add_argument("--gpu", action="store_true", help="bf16 on one CUDA GPU (both engines on it)")
    parser.add_argument("--grpo-steps", type=int, default=0, help="also time a GRPO run of this many steps")
    parser.add_argument("--sft", help="the tiny-full registry entry GRPO starts from")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.grpo_steps and not args.sft:
        parser.error("--grpo-steps needs --sft <tiny-full entry>")
    os.environ.setdefault("ATTUNE_HOME", tempfile.mkdtemp(prefix="attune-bench-rollouts-"))
    model = args.model or str(modeling.resolve("attune:tiny-llama"))
    dtype = "bfloat16" if args.gpu else "float32"
    sampling = {"n": args.n, "temperature": args.temperature, "max_tokens": args.max_tokens}
    prompts = load_prompts(model)
    ensure_ray()
    try:
        engines = start_engines(EngineSpec(count=1, cpus=ENGINE_CPUS, gpus=1 if args.gpu else 0,
                                           max_model_len=MAX_MODEL_LEN, seed=args.seed),
                                model, dtype=dtype, name=f"bench-{os.getpid()}")
        threads = None if args.vllm_default_threads else ENGINE_CPUS
        sides = {"vllm": vllm_side(model, dtype, args.gpu, args.seed, threads),
                 "attune": attune_side(engines)}
        result = {"model": model, "dtype": dtype, "device": "cuda" if args.gpu else "cpu",
                  "prompts": len(prompts), **sampling, "seed": args.seed, "engine_env": ENGINE_ENV,
                  "vllm_threads": "vLLM's default" if args.vllm_default_threads else ENGINE_CPUS,
                  "generate": compare(sides, prompts, sampling, args.rounds)}
        result["sync"] = sync_seconds_per_gb(engines, model, getattr(torch, dtype), args.syncs)
        stop_engines(engines)
        if args.wide and not args.gpu:
            hidden, layers = map(int, args.wide.split("x"))
            with tempfile.TemporaryDirectory(prefix="attune-bench-wide-") as tmp:
                wide = wider_model(model, Path(tmp), hidden, layers)
                engines = start_engines(EngineSpec(count=1, cpus=ENGINE_CPUS, max_model_len=MAX_MODEL_LEN),
                                        wide, dtype=dtype, name=f"bench-wide-{os.getpid()}")
                result["sync_wide"] = {"hidden": hidden, "layers": layers,
                                       **sync_seconds_per_gb(engines, wide, torch.float32, args.syncs)}
                stop_engines(engines)
        del sides  # the in-process engine's memory, before a GRPO run starts its own
        if args.grpo_steps:
            result["grpo"] = grpo_split(args.sft, args.grpo_steps)
    finally:
        ray.shutdown()
    out = Path(args.out or ROOT / f"bench/results/rollouts{'-gpu' if args.gpu else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("grpo",)}, indent=2)[:3000])
    if "grpo" in result:
        print(json.dumps({k: v for k, v in result["grpo"].items() if k != "per_step"}, indent=2))


if __name__ == "__main__":
    main()
