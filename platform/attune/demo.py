"""`make demo`: the whole path on one machine, from the bundled data to a model in a chat page.

    python -m attune.demo [--exit]      # --exit: stop after the checks instead of serving on

1. builds the tiny base model (first time only) and fine-tunes it on the bundled Q&A with two
   Ray Train workers (a second run resumes from the finished run and takes seconds);
2. prints questions with the base model's answers beside the fine-tuned model's;
3. serves both through Ray Serve + vLLM and asks the endpoint through the OpenAI client;
4. opens the chat page on that endpoint, the fine-tuned model selected.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time

from openai import OpenAI
from transformers.utils import logging as hf_logging

from attune import modeling
from attune.cluster import exit_now
from attune.console import VERBOSE_ENV, verbose
from attune.evaluate.greedy_answers import greedy_answers, load_for_generation, qa_pairs
from attune.recipe import load_recipe
from attune.serve.config import config_from_recipe
from attune.serve.local import run
from attune.train.trainer import fine_tune
from attune.ui import build_page, launch_page

RECIPE = "recipes/tiny-full.yaml"
SAMPLE = [0, 1, 3, 5, 40, 60, 100, 140, 180, 220]


def side_by_side(base_path: str, entry: str) -> None:
    pairs = [qa_pairs()[i] for i in SAMPLE]
    questions = [q for q, _ in pairs]
    quiet = not verbose() and hf_logging.is_progress_bar_enabled()
    if quiet:  # a "Loading weights" bar per model, above the table
        hf_logging.disable_progress_bar()
    try:
        base = greedy_answers(*load_for_generation(base_path), questions)
        tuned = greedy_answers(*load_for_generation(entry), questions)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    width = max(len(q) for q in questions)
    print(f"\n{'question':<{width}}  {'base model':<24}  fine-tuned")
    for (question, expected), b, t in zip(pairs, base, tuned):
        mark = "ok" if t == expected else f"(expected {expected})"
        print(f"{question:<{width}}  {b[:24]:<24}  {t}  {mark}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exit", action="store_true", help="stop after the checks")
    parser.add_argument("--port", type=int, default=8000, help="the API's port")
    parser.add_argument("--chat-port", type=int, default=7860, help="the chat page's port")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and vLLM's logs too")
    args = parser.parse_args()
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    # One key for this demo, in the environment before Ray starts so the replicas see it.
    api_key = os.environ.setdefault("ATTUNE_API_KEYS", f"demo-{secrets.token_hex(8)}").split(",")[0]

    start = time.time()
    recipe = load_recipe(RECIPE)
    entry = fine_tune(recipe)
    print(f"[demo] fine-tuned in {time.time() - start:.0f}s: {entry}")
    side_by_side(modeling.resolve(recipe.model.name_or_path), entry)

    endpoint = run(config_from_recipe(RECIPE), port=args.port)
    client = OpenAI(base_url=endpoint.base_url, api_key=api_key)
    question = qa_pairs()[0][0]
    reply = client.chat.completions.create(model=recipe.name, temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": question}])
    print(f"[demo] endpoint {endpoint.base_url} serves {endpoint.model_ids} (API key {api_key})")
    print(f"[demo] {question} -> {reply.choices[0].message.content!r} (via the OpenAI client)")
    print(f"[demo] up in {time.time() - start:.0f}s")
    if args.exit:
        return
    chat(endpoint.base_url, api_key, recipe.name, port=args.chat_port)


def chat(base_url: str, api_key: str, model: str, port: int = 7860) -> None:
    """The chat page on the endpoint, the fine-tuned model selected; blocks until Ctrl-C."""
    os.environ["ATTUNE_API_KEY"] = api_key  # the page's key stays on the server side
    page = build_page(base_url, model=model, compare_model="tiny-llama")
    print(f"[demo] chat page: http://127.0.0.1:{port}/  (Ctrl-C to stop)", flush=True)
    launch_page(page, host="127.0.0.1", port=port)
    exit_now(130)  # Gradio takes the Ctrl-C and closes the page; the cluster goes at once too


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before the page: end now, without a traceback
        exit_now(130)
