"""`attune generate` beside vLLM's own offline `LLM.generate`: the same entry, prompts (the
bundled questions, cycled), templating and sampling settings, each side in a process of its own,
wall time from start to the last answer (engine start included on both sides).

    PYTHONPATH=platform .venv/bin/python bench/generate.py ~/.attune/registry/tiny-full [--rows 2000]

Writes bench/results/generate.json: per side rows, completion tokens, seconds, rows/s, tokens/s;
vLLM's time in `generate` alone; and attune / vLLM of rows/s and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "generate.json"


def prompts_file(rows: int, path: Path) -> Path:
    lines = (REPO / "data" / "transformer_qa.jsonl").read_text().splitlines()
    path.write_text("".join(json.dumps({"id": i, **json.loads(lines[i % len(lines)])}) + "\n"
                            for i in range(rows)))
    return path


def attune_side(entry: str, data: Path, max_tokens: int) -> dict:
    out = data.with_name("answers.jsonl")
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attune", "generate", entry, "--data", str(data),
                    "--out", str(out), "--max-tokens", str(max_tokens), "--engines", "1"],
                   check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    return {"rows": len(answers), "completion_tokens": sum(a["completion_tokens"] for a in answers),
            "seconds": seconds}


def vllm_side(entry: str, data: Path, max_tokens: int) -> dict:
    """vLLM's offline engine with the settings attune's engines get (GenerateConfig's defaults)."""
    from attune.generate import GenerateConfig
    from attune.generate.run import entry_model
    from attune.serve.llm_config import CPU_COMPILE_ENV

    start = time.perf_counter()
    e = GenerateConfig(entry=entry, data=str(data), out="-").engine
    os.environ |= CPU_COMPILE_ENV | {"VLLM_CPU_KVCACHE_SPACE": str(e.cpu_kvcache_gib)}
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    model = entry_model(entry)
    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer)
    chats = [json.loads(line)["messages"][:-1] for line in data.read_text().splitlines()]
    ids = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for c in chats]
    lora = {"enable_lora": True, "max_lora_rank": max(e.max_lora_rank, model.lora_rank)} \
        if model.adapter else {}
    llm = LLM(model=model.weights, dtype=e.dtype, max_model_len=e.max_model_len,
              max_num_seqs=e.max_num_seqs, enable_prefix_caching=e.enable_prefix_caching,
              generation_config="auto", seed=0, **lora)
    request = None
    if model.adapter:
        from vllm.lora.request import LoRARequest
        request = LoRARequest("entry", 1, model.adapter)
    began = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids],
                           SamplingParams(temperature=0, max_tokens=max_tokens, seed=0),
                           lora_request=request, use_tqdm=False)
    end = time.perf_counter()
    return {"rows": len(outputs), "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "seconds": end - start, "generate_seconds": end - began}


def rates(side: dict) -> dict:
    return side | {"rows_per_s": side["rows"] / side["seconds"],
                   "tokens_per_s": side["completion_tokens"] / side["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("entry")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--side", choices=["vllm"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "vllm":
        result = vllm_side(args.entry, Path(args.data), args.max_tokens)
        Path(args.data).with_name("vllm.json").write_text(json.dumps(result))  # stdout has vLLM's logs
        return
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"attune-bench-generate-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    data = prompts_file(args.rows, work / "prompts.jsonl")
    subprocess.run([sys.executable, __file__, args.entry, "--side", "vllm", "--data", str(data),
                    "--max-tokens", str(args.max_tokens)], check=True, cwd=REPO)
    vllm = rates(json.loads(data.with_name("vllm.json").read_text()))
    attune = rates(attune_side(args.entry, data, args.max_tokens))
    result = {"entry": args.entry, "rows": args.rows, "max_tokens": args.max_tokens,
              "cpus": os.cpu_count(), "vllm": vllm, "attune": attune,
              "ratio_rows_per_s": attune["rows_per_s"] / vllm["rows_per_s"],
              "ratio_tokens_per_s": attune["tokens_per_s"] / vllm["tokens_per_s"]}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
