"""Serving on the real stack: Ray Serve + ray.serve.llm + vLLM (CPU) + the tiny fine-tuned models.

The session's `served_endpoint` serves the base model, its full fine-tune and a LoRA adapter.
Tests that break things (killing a replica) run last in this file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI
from running import ATTUNE, REPO

from attune.evaluate.greedy_answers import (
    exact_match,
    greedy_answers,
    load_for_generation,
    qa_pairs,
)
from attune.registry import read_manifest

pytestmark = pytest.mark.slow

QUESTIONS = qa_pairs()


def client(endpoint, key=None) -> OpenAI:
    return OpenAI(base_url=endpoint.base_url, api_key=key or endpoint.api_key, max_retries=0)


def ask(c: OpenAI, model: str, question: str, stream: bool = False, max_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": question}]
    if not stream:
        r = c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                      temperature=0)
        return r.choices[0].message.content.strip()
    chunks = c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                       temperature=0, stream=True)
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()


def ask_all(c, model, questions, stream=False) -> list[str]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda q: ask(c, model, q, stream), questions))


def post(endpoint, path: str, body: bytes | dict, key: str | None = "default") -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {endpoint.api_key if key == 'default' else key}"
    request = urllib.request.Request(endpoint.base_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            status, headers, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    return status, dict(headers), (json.loads(raw) if raw.startswith(b"{") else {"raw": raw})


def test_models_lists_base_full_and_lora(served_endpoint):
    ids = {m.id for m in client(served_endpoint).models.list().data}
    assert {"tiny-llama", "tiny-full", "tiny-llama:tiny-lora"} <= ids


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
def test_fine_tuned_model_answers_what_it_was_taught(served_endpoint, stream):
    questions, expected = zip(*QUESTIONS)
    got = ask_all(client(served_endpoint), "tiny-full", questions, stream=stream)
    assert exact_match(got, expected) >= 0.9
    base = ask_all(client(served_endpoint), "tiny-llama", questions[:40], stream=stream)
    assert exact_match(base, expected[:40]) <= 0.1


def test_lora_through_vllm_matches_merged_model_in_transformers(served_endpoint, tiny_lora_entry):
    questions = [q for q, _ in QUESTIONS[::8]]
    served = ask_all(client(served_endpoint), "tiny-llama:tiny-lora", questions)
    model, tokenizer = load_for_generation(tiny_lora_entry)  # peft adapter merged into the base
    assert served == greedy_answers(model, tokenizer, questions)


def test_adapter_promoted_after_start_is_served_without_restart(served_endpoint, tiny_lora_entry,
                                                                tmp_path):
    from attune.serve.entries import promote_adapter, read_entry

    # A second adapter: the same weights under a new registry name.
    copy = tmp_path / "tiny-lora-v2"
    shutil.copytree(tiny_lora_entry, copy)
    manifest = json.loads((copy / "attune.json").read_text())
    (copy / "attune.json").write_text(json.dumps({**manifest, "name": "tiny-lora-v2"}))

    model_id = promote_adapter(read_entry(str(copy)), served_endpoint.config)
    assert model_id == "tiny-llama:tiny-lora-v2"
    c = client(served_endpoint)
    assert model_id in {m.id for m in c.models.list().data}
    question = QUESTIONS[0][0]
    assert ask(c, model_id, question) == ask(c, "tiny-llama:tiny-lora", question)


def test_auth(served_endpoint):
    body = {"model": "tiny-full", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "wrong-key"):
        status, headers, error = post(served_endpoint, "/chat/completions", body, key=key)
        assert status == 401
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert served_endpoint.api_key not in json.dumps(error)
    assert post(served_endpoint, "/chat/completions", b"not json", key=None)[0] == 401  # key first
    assert post(served_endpoint, "/chat/completions", body)[0] == 200
    health = served_endpoint.base_url.removesuffix("/v1") + "/-/healthz"
    assert urllib.request.urlopen(health, timeout=10).status == 200  # open without a key


GOOD = {"model": "tiny-full", "messages": [{"role": "user", "content": QUESTIONS[0][0]}],
        "max_tokens": 8, "temperature": 0}
BAD_REQUESTS = {
    "malformed json": b'{"model": "tiny-full", "messages": [',
    "missing messages": {"model": "tiny-full"},
    "unknown model": {**GOOD, "model": "no-such-model"},
    "unknown adapter": {**GOOD, "model": "tiny-llama:no-such-adapter"},
    "max_tokens zero": {**GOOD, "max_tokens": 0},
    "max_tokens beyond context": {**GOOD, "max_tokens": 100_000},
    "empty messages": {**GOOD, "messages": []},
    "prompt longer than the model": {**GOOD, "messages": [{"role": "user", "content": "attention " * 2000}]},
    "wrong type": {**GOOD, "temperature": "hot"},
    "unknown role": {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]},
    "not json": b"hello",
    "messages not a list": {**GOOD, "messages": {"role": "user", "content": "hi"}},
    "object content": {**GOOD, "messages": [{"role": "user", "content": {"text": "hi"}}]},
    "string in content list": {**GOOD, "messages": [{"role": "user", "content": ["hi"]}]},
    "string for stream": {**GOOD, "stream": "true"},
    "string for max_tokens": {**GOOD, "max_tokens": "8"},
    "number for a stop string": {**GOOD, "stop": [1]},
}
GOOD_COMPLETION = {"model": "tiny-full", "prompt": QUESTIONS[0][0], "max_tokens": 8,
                   "temperature": 0}
BAD_COMPLETIONS = {
    "malformed json": b'{"model": "tiny-full", "prompt": ',
    "not json": b"hello",
    "object prompt": {**GOOD_COMPLETION, "prompt": {"text": "hi"}},
    "string for stream": {**GOOD_COMPLETION, "stream": "true"},
    "string for max_tokens": {**GOOD_COMPLETION, "max_tokens": "8"},
    "string for echo": {**GOOD_COMPLETION, "echo": "false"},
}


def bad_requests(*skip: str) -> list:
    """(path, body) of every bad request, for pytest.mark.parametrize."""
    return ([pytest.param("/chat/completions", body, id=f"chat: {name}")
             for name, body in BAD_REQUESTS.items() if name not in skip]
            + [pytest.param("/completions", body, id=f"completion: {name}")
               for name, body in BAD_COMPLETIONS.items()])


@pytest.mark.parametrize("path, bad", bad_requests())
def test_bad_request_gets_a_4xx_and_the_service_keeps_answering(served_endpoint, path, bad):
    assert_refused_then_answers(served_endpoint, bad, path)


def assert_refused_then_answers(endpoint, bad: bytes | dict, path: str) -> None:
    """A 4xx in OpenAI's error shape for `bad`, then a right answer to a good request."""
    status, _, body = post(endpoint, path, bad)
    assert 400 <= status < 500, (status, body)
    assert body["error"]["message"], body
    assert {"message", "type", "code"} <= set(body["error"])
    status, _, answer = post(endpoint, "/chat/completions", GOOD)
    assert status == 200 and answer["choices"][0]["message"]["content"].strip() == QUESTIONS[0][1]


def test_types_are_checked_as_openai_checks_them(served_endpoint):
    assert_types_checked_as_openai_does(served_endpoint)


def assert_types_checked_as_openai_does(endpoint) -> None:
    """A wrongly typed field is a 400 that names it; what OpenAI's Python client and attune's
    chat page send passes: nulls, ints where floats belong, content parts, stop lists, n > 1,
    streams with usage."""
    from attune.ui.chat import GenerationSettings, Turn, messages_for, stream_reply

    status, _, body = post(endpoint, "/chat/completions", BAD_REQUESTS["object content"])
    assert status == 400 and body["error"]["param"] == "messages[0].content", body
    assert "expected a string or an array of objects, got an object" in body["error"]["message"]

    c, question = client(endpoint), QUESTIONS[0][0]
    parts = [{"role": "system", "content": [{"type": "text", "text": "Answer."}]},
             {"role": "user", "content": [{"type": "text", "text": question}]}]
    r = c.chat.completions.create(model="tiny-full", messages=parts, n=2, temperature=1, top_p=1,
                                  seed=0, stop=["\n", "."], max_completion_tokens=8, user=None)
    assert len(r.choices) == 2
    stream = c.chat.completions.create(
        model="tiny-full", messages=[{"role": "user", "content": question}], max_tokens=8,
        temperature=0.0, stop=None, stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage.completion_tokens for chunk in stream if chunk.usage]
    assert len(usage) == 1 and 0 < usage[0] <= 8
    r = c.completions.create(model="tiny-full", prompt=[question, question], max_tokens=4,
                             temperature=0, echo=False, logprobs=1, stop="\n")
    assert len(r.choices) == 2
    settings = GenerationSettings(system_prompt="Answer.", stop=("\n",), max_tokens=8)
    turns = [Turn(user="hi", answer="hello")]
    *_, reply = stream_reply(c, "tiny-full", messages_for(turns, question, settings), settings)
    assert reply.error is None and reply.text


def test_64_concurrent_streams_all_complete(served_endpoint):
    questions = [q for q, _ in QUESTIONS[:64]]
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda q: ask(client(served_endpoint), "tiny-full", q, stream=True),
                                questions))
    assert all(answers) and len(answers) == 64


def sse_events(endpoint, body: dict) -> list:
    """A streamed chat answer's events, raw: parsed JSON, and "[DONE]" as the string."""
    import httpx

    events = []
    with httpx.stream("POST", endpoint.base_url + "/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {endpoint.api_key}"}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streams_end_in_openai_order_and_every_choice_streams(served_endpoint):
    """attune sends a stream's last events (finish, usage, [DONE]) as one message from the model
    server and ends the response at [DONE] (test_serve_streams): the client still sees OpenAI's
    stream, an event per token, and with n=2 (sampled: vLLM takes n>1 only so) both choices to
    their end."""
    body = {"model": "tiny-full", "messages": [{"role": "user", "content": QUESTIONS[0][0]}],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    status, _, plain = post(served_endpoint, "/chat/completions", body)
    assert status == 200
    answer = plain["choices"][0]["message"]["content"]
    events = sse_events(served_endpoint, {**body, "stream_options": {"include_usage": True}})
    *chunks, usage, done = events
    assert done == "[DONE]"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    texts = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert sum(bool(t) for t in texts) > 1
    assert "".join(t or "" for t in texts) == answer

    both = sse_events(served_endpoint, {**body, "n": 2, "temperature": 1.0, "seed": 0})
    assert both[-1] == "[DONE]"
    by_choice: dict = {0: [], 1: []}
    for event in both[:-1]:
        for choice in event["choices"]:
            by_choice[choice["index"]].append(choice)
    for choices in by_choice.values():
        assert choices[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in choices[:-1])
        assert "".join(c["delta"].get("content") or "" for c in choices)


def test_every_deployment_yaml_loads_through_serve_schema_and_builder(served_endpoint):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from attune.config import validate
    from attune.serve import ServeConfig

    files = sorted(Path("deployments").glob("*.yaml"))
    assert files
    for path in files:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        for app in schema.applications:
            if app.import_path == "attune.serve:build_app":
                validate(ServeConfig, app.args, str(path))


def test_eval_runs_lm_evaluation_harness_against_the_served_entry(served_endpoint, tiny_full_entry,
                                                                   tmp_path):
    """`attune eval --endpoint`: the harness's own runner asks the served model each question over
    the chat API and scores it as attune scores its greedy answers in torch. Half the expected
    answers are wrong, so both must find the same half."""
    entry = tmp_path / "tiny-full"
    shutil.copytree(tiny_full_entry, entry)
    pairs = QUESTIONS[:12]
    held_out = tmp_path / "qa.jsonl"
    held_out.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q},
        {"role": "assistant", "content": a if i % 2 else f"not {a}"}]}) + "\n"
        for i, (q, a) in enumerate(pairs)))
    scored = subprocess.run(
        [*ATTUNE, "eval", str(entry), "--data", str(held_out), "--endpoint", served_endpoint.base_url,
         "--model", served_endpoint.finetuned_model_id, "--tasks", "attune_qa"],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "ATTUNE_API_KEY": served_endpoint.api_key})
    assert scored.returncode == 0, scored.stderr[-3000:]
    scores = read_manifest(str(entry))["eval"]["scores"]
    assert scores["attune_qa.exact_match"] == scores["exact_match"], scores
    assert 0.25 <= scores["exact_match"] <= 0.5, scores  # the model answers its own questions right
    assert f"attune_qa.exact_match {scores['exact_match']:.4f}" in scored.stdout


def test_a_second_app_on_another_port_is_refused_and_the_first_keeps_serving(served_endpoint):
    """Serve's one proxy keeps its first port: an app asked elsewhere would not be where it says."""
    from attune.cluster import free_port
    from attune.config import ConfigError
    from attune.serve.local import run

    listening = int(served_endpoint.base_url.rsplit(":", 1)[1].removesuffix("/v1"))
    with pytest.raises(ConfigError, match=f"already listens on 127.0.0.1:{listening}"):
        run(served_endpoint.config, port=free_port(), name="elsewhere")
    assert ask(client(served_endpoint), "tiny-full", QUESTIONS[0][0])


def test_overload_beyond_the_queue_is_refused_not_queued(served_endpoint):
    """The endpoint holds 16 requests at work and 64 waiting per model (conftest): a burst of 160
    gets the rest refused at once, 503 with Retry-After, and the admitted ones answered."""
    c = served_endpoint.config
    room = c.max_ongoing_requests + c.max_queued_requests
    burst = {"model": "tiny-full", "messages": [{"role": "user", "content": "hi"}],
             "max_tokens": 32, "ignore_eos": True}
    with ThreadPoolExecutor(2 * room) as pool:
        results = list(pool.map(lambda _: post(served_endpoint, "/chat/completions", burst),
                                range(2 * room)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 429, 503}, statuses
    refused = [(h, b) for s, h, b in results if s in (429, 503)]
    assert refused, statuses
    assert all({k.lower() for k in h} >= {"retry-after"} for h, _ in refused)
    # OpenAI-shaped, saying why (Serve's own refusal is plain text; attune re-shapes it)
    assert all("backpressure" in b["error"]["message"] for _, b in refused), refused[0][1]


def model_server_processes() -> dict:
    """The processes of the app's model server replicas (LLMServer), by replica name."""
    return replica_processes("LLMServer")


def replica_processes(deployment: str) -> dict:
    """The processes of the app's replicas of one deployment, by replica name."""
    import os

    import psutil
    import ray

    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and f"#{deployment}" in a["name"]]
    assert replicas, f"no {deployment} replica found"
    pids = {name: ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(
        lambda _: os.getpid())) for name in replicas}
    return {name: psutil.Process(pid) for name, pid in pids.items()}


def test_haproxy_hands_requests_to_the_ingress_replica_on_loopback(served_endpoint):
    """In attune's own Ray, Serve's HAProxy holds the endpoint's port, not Serve's Python proxy,
    and the ingress replica answers HTTP itself (attune.cluster.embedded_cluster_env): on the
    endpoint's loopback host only, as the endpoint does, so no port of the app is open beyond
    the machine."""
    from urllib.parse import urlparse

    import psutil
    from ray.serve._private.constants import (RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
                                              RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT)

    port = urlparse(served_endpoint.base_url).port
    (endpoint,) = [c for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert psutil.Process(endpoint.pid).name() == "haproxy"
    (ingress,) = replica_processes("Ingress").values()
    http = [c.laddr for c in ingress.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            and RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT <= c.laddr.port
            < RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT]
    assert [a.ip for a in http] == ["127.0.0.1"], http


def test_engines_run_at_normal_priority_in_attunes_own_ray(served_endpoint):
    """Ray starts workers at nice 15; in the Ray attune starts for itself the model servers and
    their vLLM engine processes run at 0, as `vllm serve` does, and Serve's controller loop runs
    less often (attune.cluster.embedded_cluster_env)."""
    import os

    import psutil
    import ray

    for name, process in model_server_processes().items():
        engine = process.children(recursive=True)  # vLLM's EngineCore (and worker, if any)
        assert engine, f"{name} has no engine processes"
        niceness = [(p.name(), p.nice()) for p in [process, *engine]]
        assert all(nice == 0 for _, nice in niceness), niceness
    # and Serve's controller reconciles every 0.5 s instead of 0.1 (CPU it would take from them)
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    environ = psutil.Process(ray.get(controller.__ray_call__.remote(lambda _: os.getpid()))).environ()
    assert environ.get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S") == "0.5"


def test_on_a_node_of_two_cpus_the_model_runs_in_the_engine_process(served_endpoint):
    """engine.cpu_executor 'auto': vLLM's 'uni' executor where its CPU worker would compute on a
    single core; with more CPUs, vLLM's worker process of its own."""
    import os

    in_engine = len(os.sched_getaffinity(0)) <= 2  # this node is the cluster's only one
    for process in model_server_processes().values():
        names = [p.name() for p in process.children(recursive=True)]
        assert any(n.startswith("VLLM::EngineCor") for n in names), names
        assert any("Worker" in n for n in names) != in_engine, names


def test_killed_replica_is_replaced_and_endpoint_answers_again(served_endpoint):
    import time

    import ray

    victims = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == "serve" and "LLMServer:tiny-full" in a["name"]]
    assert victims, "no tiny-full replica found"
    ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
    c = client(served_endpoint)
    deadline, answer = time.time() + 300, None
    while time.time() < deadline:
        try:
            answer = ask(c, "tiny-full", QUESTIONS[0][0])
            break
        except Exception:
            time.sleep(3)
    assert answer == QUESTIONS[0][1]
