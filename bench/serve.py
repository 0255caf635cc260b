"""Serving benchmark: attune's endpoint (Ray Serve + ray.serve.llm + vLLM) vs vLLM's own server.

    .venv/bin/python bench/serve.py [--rounds 2] [--requests 200] [--sides ...] [--session own|shared]

Same machine, fine-tuned tiny model and request mix for every server: streaming chats of 64
output tokens (ignore_eos) at concurrency 1, 8 and 32. Writes output tokens/s, TTFT and
inter-token latency (p50/p99), and ratios to plain vLLM, to bench/results/serve.json. vLLM's
server with attune's plugin on tells the plugin's share from the rest of attune's stack.

A shared machine's speed drifts, so the servers take turns (vLLM, each attune side, vLLM with
the plugin, vLLM, ...) and each figure is compared with the plain vLLM runs on either side of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

OUTPUT_TOKENS = 64
CONCURRENCY = (1, 8, 32)
KEY = "bench-key"
LOGS = Path(tempfile.gettempdir()) / "attune-bench-serve"  # each server's output
# attune's configurations: the default app with stream batching off (the default) and at 20 ms,
# behind Serve's Python proxy instead of HAProxy, and direct streaming (vLLM's server as the
# ingress), also with the model in vLLM's worker process instead of the engine process.
SIDES = {"batching_0ms": {"batching_ms": 0}, "batching_20ms": {"batching_ms": 20},
         "python_proxy": {"env": {"RAY_SERVE_ENABLE_HA_PROXY": "0"}},
         "direct_streaming": {"direct": True},
         "direct_streaming_mp": {"direct": True, "engine": {"cpu_executor": "mp"}}}
DEFAULT_SIDES = ["direct_streaming", "batching_0ms"]
# vLLM's own server with attune's vLLM plugin switched on as attune's app does on CPU: what of
# attune's figures is the plugin and what is the rest of its stack.
VLLM_PLUGIN = "vllm_attune_plugin"


def requests_at(concurrency: int, requests: int) -> int:
    return max(requests, 25 * concurrency)


async def one_request(client, model: str, question: str) -> dict:
    start = time.perf_counter()
    stamps = []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=OUTPUT_TOKENS,
        temperature=0, stream=True, extra_body={"ignore_eos": True, "min_tokens": OUTPUT_TOKENS})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": OUTPUT_TOKENS, "end": stamps[-1]}


async def load(base_url: str, model: str, concurrency: int, requests: int, questions) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0)
    await one_request(client, model, questions[0])  # warm-up
    queue = list(range(requests))
    results = []

    async def worker():
        while queue:
            i = queue.pop()
            results.append(await one_request(client, model, questions[i % len(questions)]))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    ttft = sorted(r["ttft"] * 1000 for r in results)
    itl = sorted(x * 1000 for r in results for x in r["itl"])
    await client.close()
    return {"output_tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
            "ttft_ms_p50": statistics.median(ttft), "ttft_ms_p99": ttft[int(0.99 * (len(ttft) - 1))],
            "itl_ms_p50": statistics.median(itl), "itl_ms_p99": itl[int(0.99 * (len(itl) - 1))]}


def run_levels(base_url, model, requests, questions) -> dict:
    return {str(c): asyncio.run(load(base_url, model, c, requests_at(c, requests), questions))
            for c in CONCURRENCY}


def wait_for(url: str, server: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}); its log: {log}")
        try:
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
            urllib.request.urlopen(request, timeout=5)
            return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"{url} (server log: {log})")


def bench_vllm(entry: str, requests: int, questions, own_session: bool,
               plugin: bool = False) -> dict:
    from attune.serve.llm_config import CPU_POLL_SLEEP_US
    from attune.serve.vllm_plugin import CPU_EXECUTOR_ENV, POLL_SLEEP_ENV

    port = 8031
    # attune's plugin is installed beside vLLM; without its variables it leaves vLLM as it is
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
           CPU_EXECUTOR_ENV: "auto" if plugin else "",
           POLL_SLEEP_ENV: str(CPU_POLL_SLEEP_US) if plugin else ""}
    log = LOGS / f"vllm{'-attune-plugin' if plugin else ''}.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", entry,
         "--served-model-name", "tiny-full", "--port", str(port), "--max-model-len", "512",
         "--api-key", KEY], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=own_session)
    try:
        wait_for(f"http://127.0.0.1:{port}/v1/models", server, log)
        return run_levels(f"http://127.0.0.1:{port}/v1", "tiny-full", requests, questions)
    finally:
        server.terminate()
        server.wait(60)


def bench_attune(entry: str, requests: int, questions, own_session: bool,
                 batching_ms: float = 0, direct: bool = False, env: dict | None = None,
                 engine: dict | None = None) -> dict:
    # One engine, as on the vLLM side: the fine-tuned entry served as a model of its own. Like
    # vLLM's, the server runs apart from this client (`attune serve`, output to a file), so
    # neither side's logging lands in the process that measures.
    port = 8032
    config = {"base_models": [{"id": "tiny-full", "name_or_path": entry}],
              "engine": {"max_model_len": 512, "stream_batching_interval_ms": batching_ms,
                         **(engine or {})},
              "direct_streaming": direct}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(config, f)
        f.flush()
        env = env or {}
        side = "direct" if direct else f"batching-{batching_ms:g}ms"
        settings = {**(engine or {}), **env}
        log = LOGS / f"attune-{side}{''.join(f'-{k}={v}' for k, v in settings.items())}.log"
        server = subprocess.Popen(
            [sys.executable, "-m", "attune", "serve", f.name, "--port", str(port)],
            env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=own_session,
            # Ctrl-C stops it below, also when this script runs in the background (nohup, &),
            # whose children inherit an ignored SIGINT
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_for(f"http://127.0.0.1:{port}/v1/models", server, log)
            return run_levels(f"http://127.0.0.1:{port}/v1", "tiny-full", requests, questions)
        finally:
            server.send_signal(signal.SIGINT)  # `attune serve` stops Serve and its Ray on Ctrl-C
            server.wait(120)


def ratios(attune: dict, vllm: dict) -> dict:
    return {c: {"throughput": attune[c]["output_tokens_per_s"] / vllm[c]["output_tokens_per_s"],
                "ttft_p50_delta_ms": attune[c]["ttft_ms_p50"] - vllm[c]["ttft_ms_p50"]}
            for c in vllm}


def mean_by_level(runs: list[dict]) -> dict:
    """Figures (or ratios) of several runs, {concurrency: {name: value}}, averaged."""
    return {c: {k: statistics.mean(r[c][k] for r in runs) for k in runs[0][c]} for c in runs[0]}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2, help="turns of every side, then vLLM")
    parser.add_argument("--requests", type=int, default=200,
                        help="requests at concurrency 1; 25 x the concurrency above it")
    parser.add_argument("--sides", nargs="+", choices=[*SIDES, VLLM_PLUGIN],
                        default=[*DEFAULT_SIDES, VLLM_PLUGIN],
                        help="attune's configurations to measure, and vLLM's server with attune's "
                        "plugin (plain vLLM is always the baseline)")
    parser.add_argument("--session", choices=["own", "shared"], default="own",
                        help="each server in a session of its own, as from a terminal of its own "
                        "or as a service, or in this client's (Linux schedules sessions as groups)")
    parser.add_argument("--out", help="results file; default bench/results/serve.json, or "
                        "serve-shared-session.json beside it for --session shared")
    args = parser.parse_args()
    os.environ.setdefault("ATTUNE_HOME", "/tmp/attune-bench")
    os.environ["ATTUNE_API_KEYS"] = KEY
    LOGS.mkdir(exist_ok=True)

    import ray

    from attune.evaluate.greedy_answers import qa_pairs
    from attune.recipe import load_recipe
    from attune.train.trainer import fine_tune

    entry = fine_tune(load_recipe("recipes/tiny-full.yaml"))  # resumes if already trained
    ray.shutdown()  # the training cluster would idle beside both servers
    questions = [q for q, _ in qa_pairs()]
    own_session = args.session == "own"
    result = {"server_session": args.session,
              "requests_per_level": {str(c): requests_at(c, args.requests) for c in CONCURRENCY},
              "output_tokens": OUTPUT_TOKENS, "rounds": []}
    out = Path(args.out or f"bench/results/serve{'-shared-session' if not own_session else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    attune_sides = [name for name in args.sides if name in SIDES]
    with_plugin = VLLM_PLUGIN in args.sides
    compared = [f"attune_{name}" for name in attune_sides]
    compared += [VLLM_PLUGIN] if with_plugin else []
    vllm_runs = [bench_vllm(entry, args.requests, questions, own_session)]
    for _ in range(args.rounds):
        turn = {}
        # Ray Serve LLM gathers streamed tokens for stream_batching_interval_ms (Ray's default
        # 50) before sending: 0 is attune's default; 20 trades first-token latency for fewer messages.
        for name in attune_sides:
            turn[f"attune_{name}"] = bench_attune(entry, args.requests, questions, own_session,
                                                  **SIDES[name])
        if with_plugin:
            turn[VLLM_PLUGIN] = bench_vllm(entry, args.requests, questions, own_session,
                                           plugin=True)
        vllm_runs.append(bench_vllm(entry, args.requests, questions, own_session))
        turn["vllm_before"], turn["vllm_after"] = vllm_runs[-2:]
        baseline = mean_by_level(vllm_runs[-2:])
        for name in compared:
            turn[f"ratios_{name}"] = ratios(turn[name], baseline)
        result["rounds"].append(turn)
        for name in compared:
            result[f"ratios_{name}"] = mean_by_level([t[f"ratios_{name}"] for t in result["rounds"]])
        out.write_text(json.dumps(result, indent=2) + "\n")  # a partial run keeps what it measured
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
