"""Direct streaming on the real stack: `attune serve` with `direct_streaming: true` on a Ray
cluster started with Serve's HAProxy ingress; the fine-tuned model's vLLM server is the app's ingress.
The same promises as the default app: taught answers, API keys, 4xx for bad input, 503 with
Retry-After beyond the queue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import API_KEY, ServedEndpoint, ray_start_head, stop_group
from test_serve import (
    QUESTIONS,
    ask,
    assert_refused_then_answers,
    assert_types_checked_as_openai_does,
    bad_requests,
    client,
    post,
)

from attune.cluster import free_port
from attune.evaluate.greedy_answers import exact_match
from attune.serve.vllm_plugin import CPU_EXECUTOR_ENV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def direct_head():
    """A `ray start --head` cluster started with Serve's HAProxy switch (Serve reads it once, at
    start). A direct-ingress replica drains for 30 s before it stops, for load balancers to
    notice; here nothing balances but the cluster's own HAProxy, and the teardown waited for it."""
    with ray_start_head(RAY_SERVE_ENABLE_HA_PROXY="1",
                        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="2") as head:
        yield head


@pytest.fixture(scope="module")
def direct_endpoint(tiny_full_entry, tmp_path_factory, direct_head):
    """`attune serve` on that cluster, room for 2 requests at work and 2 waiting, so that a
    burst meets the queue's limit; the model in a worker process of its own, vLLM's way on CPU
    (the default app, in test_serve, runs it in the engine process)."""
    config = {"base_models": [{"id": "tiny-full", "name_or_path": tiny_full_entry}],
              "direct_streaming": True, "engine": {"cpu_executor": "mp"},
              "max_ongoing_requests": 2, "max_queued_requests": 2}
    folder = tmp_path_factory.mktemp("direct")
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(folder / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "attune", "serve", str(folder / "serve.yaml"), "--port", str(port)],
            env={**os.environ, "RAY_ADDRESS": direct_head.gcs, "ATTUNE_API_KEYS": API_KEY},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        endpoint = ServedEndpoint(f"http://127.0.0.1:{port}/v1", API_KEY, "", "tiny-full", "", config)
        try:
            _wait_until_serving(endpoint, proc, folder / "serve.log")
            yield endpoint
        finally:
            stop_group(proc, signal.SIGINT, timeout=120)  # Ctrl-C: `attune serve` stops Serve


def _wait_until_serving(endpoint, proc, log_path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"attune serve exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if client(endpoint).models.list().data:
                return
        except Exception:  # not up yet
            time.sleep(2)
    pytest.fail(f"attune serve did not answer in {timeout} s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
def test_direct_model_answers_what_it_was_taught(direct_endpoint, stream):
    assert [m.id for m in client(direct_endpoint).models.list().data] == ["tiny-full"]
    questions, expected = zip(*QUESTIONS)
    with ThreadPoolExecutor(2) as pool:  # within the fixture's 2 requests at work
        got = list(pool.map(lambda q: ask(client(direct_endpoint), "tiny-full", q, stream), questions))
    assert exact_match(got, expected) >= 0.9


def test_direct_auth(direct_endpoint):
    body = {"model": "tiny-full", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "wrong-key"):
        status, _, error = post(direct_endpoint, "/chat/completions", body, key=key)
        assert status == 401
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert API_KEY not in str(error)
    assert post(direct_endpoint, "/chat/completions", b"not json", key=None)[0] == 401  # key first
    assert post(direct_endpoint, "/chat/completions", body)[0] == 200
    root = direct_endpoint.base_url.removesuffix("/v1")
    for health in ("/-/healthz", "/health"):  # Serve's and vLLM's, open without a key
        assert urllib.request.urlopen(root + health, timeout=10).status == 200


def test_direct_endpoint_serves_vllms_engine_metrics_behind_the_key(direct_endpoint):
    """Under direct streaming the engine's metrics are vLLM's own, at the endpoint's /metrics as
    `vllm serve` has them, instead of going out through Ray's export (engine.ray_metrics)."""
    body = {"model": "tiny-full", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "ignore_eos": True}
    assert post(direct_endpoint, "/chat/completions", body)[0] == 200
    url = direct_endpoint.base_url.removesuffix("/v1") + "/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    generated = [line for line in text.splitlines()
                 if line.startswith("vllm:generation_tokens_total{") and 'model_name="tiny-full"' in line]
    assert generated and float(generated[0].rsplit(" ", 1)[1]) >= 3, generated


def test_direct_engine_waits_for_its_worker_without_spinning(direct_endpoint):
    """With the model in a worker process (engine.cpu_executor: mp), attune's vLLM plugin is on
    in the engine core and the worker: each says so in its own output, read from wherever its
    stdout and stderr go (Ray's log files of the replica that started it)."""
    wanted = {"(EngineCore", "(VllmWorker-0"}
    deadline = time.monotonic() + 120  # a loaded machine may write the worker's line late
    while not wanted <= (said := set(_plugin_lines(PLUGIN_PHRASE))):
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= said, _where_engines_write()


PLUGIN_PHRASE = "queue waits sleep 20 us"


def _direct_engines() -> list[psutil.Process]:
    """This machine's vLLM processes with the model in a worker process: only the direct app
    runs its engine so (the session's apps keep the model in the engine process)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if ((proc.info["cmdline"] or [""])[0].startswith("VLLM::")
                    and proc.environ().get(CPU_EXECUTOR_ENV) == "mp"):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _outputs(proc: psutil.Process) -> set[str]:
    """The files its stdout and stderr are."""
    return {target for fd in (1, 2)
            if os.path.isfile(target := os.readlink(f"/proc/{proc.pid}/fd/{fd}"))}


def _plugin_lines(phrase: str) -> dict[str, str]:
    """'(Process' prefix -> the line of each direct engine process that holds the phrase."""
    lines = {}
    for proc in _direct_engines():
        mark = f" pid={proc.pid})"
        for path in _outputs(proc):
            for line in Path(path).read_text(errors="replace").splitlines():
                if phrase in line and mark in line:
                    # '(EngineCore pid=9) INFO ...', its prefix maybe in color codes
                    lines["(" + line.split(" pid=")[0].rsplit("(", 1)[-1]] = line
    return lines


def _where_engines_write() -> str:
    """What the assertion shows when a process's line is missing."""
    return "; ".join(f"{p.pid} {p.info['cmdline'][0]}: stdout/stderr {sorted(_outputs(p))}"
                     for p in _direct_engines()) or "no direct engine process found"


@pytest.mark.parametrize("path, bad", bad_requests("unknown adapter"))
def test_direct_bad_request_gets_a_4xx_and_the_service_keeps_answering(direct_endpoint, path, bad):
    assert_refused_then_answers(direct_endpoint, bad, path)


def test_direct_types_are_checked_as_openai_checks_them(direct_endpoint):
    assert_types_checked_as_openai_does(direct_endpoint)


def test_direct_overload_beyond_the_queue_is_refused_with_retry_after(direct_endpoint):
    # long answers, so that the burst is still at work when its last requests arrive
    burst = {"model": "tiny-full", "messages": [{"role": "user", "content": "hi"}],
             "max_tokens": 400, "ignore_eos": True}
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: _post_raw(direct_endpoint, burst), range(12)))
    statuses = sorted(status for status, _ in results)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 503}, statuses
    refused = [headers for status, headers in results if status == 503]
    assert refused and all(h.get("retry-after") == "1" for h in refused), statuses


def _post_raw(endpoint, body: dict) -> tuple[int, dict]:
    """The status and headers only: Serve's own refusal is plain text, not JSON."""
    import json

    request = urllib.request.Request(
        endpoint.base_url + "/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            r.read()
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}
