"""LoRA on one machine: `attune serve` of a LoRA recipe whose registry is a local directory
serves the adapter with no object store, `attune promote` puts a new adapter live, and Ctrl-C
ends it all within seconds (the case first reported, as tests/test_ctrl_c.py checks the others)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from openai import OpenAI
from running import ATTUNE, REPO, Command
from test_serve import QUESTIONS, ask, ask_all

from attune.cluster import free_port
from attune.evaluate.greedy_answers import greedy_answers, load_for_generation
from conftest import API_KEY

pytestmark = pytest.mark.slow


def test_a_lora_entry_in_a_local_registry_is_served_and_promoted(tiny_lora_entry, tmp_path):
    port = free_port()
    env = {"ATTUNE_API_KEYS": API_KEY, "ATTUNE_HOME": os.environ["ATTUNE_HOME"]}
    command = Command([*ATTUNE, "serve", "recipes/tiny-lora.yaml", "--port", str(port)], tmp_path,
                      **env)
    try:
        command.wait_for("[attune] serving at", timeout=300)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)
        assert "tiny-llama:tiny-lora" in {m.id for m in client.models.list().data}
        questions = [q for q, _ in QUESTIONS[::16]]
        served = ask_all(client, "tiny-llama:tiny-lora", questions)
        model, tokenizer = load_for_generation(tiny_lora_entry)  # the adapter merged, in torch
        assert served == greedy_answers(model, tokenizer, questions)

        copy = tmp_path / "tiny-lora-v2"  # the same weights under a new registry name
        shutil.copytree(tiny_lora_entry, copy)
        manifest = json.loads((copy / "attune.json").read_text())
        (copy / "attune.json").write_text(json.dumps({**manifest, "name": "tiny-lora-v2"}))
        promoted = subprocess.run([*ATTUNE, "promote", str(copy), "--config",
                                   "recipes/tiny-lora.yaml"], cwd=REPO, capture_output=True,
                                  text=True, env={**os.environ, **env})
        assert "serves it now as 'tiny-llama:tiny-lora-v2'" in promoted.stdout, promoted.stderr
        assert "tiny-llama:tiny-lora-v2" in {m.id for m in client.models.list().data}
        assert ask(client, "tiny-llama:tiny-lora-v2", questions[0]) == served[0]
    finally:
        command.ctrl_c()
    assert command.left_running() == {}
