"""The serving config refuses what cannot be served before anything is deployed, naming the key."""

from __future__ import annotations

import pytest

from attune.config import ConfigError, validate
from attune.modeling import ensure_tiny_llama
from attune.serve import ServeConfig

TINY = {"id": "tiny-llama", "name_or_path": "attune:tiny-llama"}


@pytest.mark.parametrize("args, message", [
    ({"base_models": [TINY], "engin": {}}, "engin"),
    ({"base_models": [TINY, TINY]}, "duplicate ids"),
    ({"base_models": [TINY], "lora_store": "adapters"}, "lora_store: .adapters. is neither"),
    ({"base_models": [TINY], "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
    ({"base_models": [TINY], "entries": ["/tmp/tiny-full"], "direct_streaming": True},
     "direct_streaming: serves exactly one model"),
    ({"base_models": [TINY], "lora_store": "s3://b/adapters", "direct_streaming": True},
     "direct_streaming"),
    ({"base_models": [TINY], "engine": {"poll_sleep_us": -1}}, "engine.poll_sleep_us"),
    ({"base_models": [TINY], "engine": {"cpu_executor": "ray"}}, "engine.cpu_executor"),
])
def test_bad_serving_configs_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        validate(ServeConfig, args, "serve args")


def test_one_model_may_be_served_directly():
    config = validate(ServeConfig, {"base_models": [TINY], "direct_streaming": True}, "serve args")
    assert config.direct_streaming and config.auth == "api_key"


def test_building_a_direct_app_without_the_ha_proxy_says_what_to_set():
    """In a process started without RAY_SERVE_ENABLE_HA_PROXY=1, as pytest is (its embedded Ray
    has it, from attune.cluster.embedded_cluster_env, but only while that Ray starts)."""
    from attune.serve import build_app

    with pytest.raises(RuntimeError, match="RAY_SERVE_ENABLE_HA_PROXY=1"):
        build_app({"base_models": [TINY], "direct_streaming": True})


def test_a_plain_text_overload_answer_becomes_an_openai_error_with_retry_after():
    """Serve answers a full queue with a plain-text 503 (its own exception handler, installed
    over any of the app's); the middleware re-shapes it and leaves other answers alone."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from attune.serve.ingress import RetryAfterMiddleware

    app = Starlette(routes=[
        Route("/full", lambda r: PlainTextResponse("Request dropped due to backpressure", 503)),
        Route("/shaped", lambda r: JSONResponse({"error": {"message": "busy"}}, 429)),
        Route("/ok", lambda r: PlainTextResponse("fine")),
    ])
    client = TestClient(RetryAfterMiddleware(app))

    full = client.get("/full")
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json() == {"error": {"message": "Request dropped due to backpressure",
                                     "type": "server_error", "param": None, "code": 503}}
    shaped = client.get("/shaped")
    assert shaped.json() == {"error": {"message": "busy"}} and shaped.headers["retry-after"] == "1"
    ok = client.get("/ok")
    assert ok.text == "fine" and "retry-after" not in ok.headers


def test_route_errors_come_back_in_openai_shape_from_plain_asgi_in_rays_place():
    """Ray LLM's exception middleware (a BaseHTTPMiddleware) swapped for plain ASGI: the same
    answers, without a task and a memory stream per request."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from ray.llm._internal.serve.core.ingress.ingress import init
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import StreamingResponse

    from attune.serve.ingress import ApplicationErrorsMiddleware, use_plain_asgi_errors

    app: FastAPI = init()
    ray_stack = [m.cls for m in app.user_middleware]
    use_plain_asgi_errors(app)
    assert [m.cls for m in app.user_middleware] == [
        ApplicationErrorsMiddleware if cls is BaseHTTPMiddleware else cls for cls in ray_stack]

    @app.get("/broken")
    async def broken():
        raise ValueError("no such thing")

    @app.post("/typed")
    async def typed(n: int):
        return {"n": n}

    @app.get("/stream")
    async def stream():
        async def tokens():
            yield "data: 1\n\n"
            raise ValueError("engine died mid-stream")
        return StreamingResponse(tokens(), media_type="text/event-stream")

    client = TestClient(app, raise_server_exceptions=False)
    broken = client.get("/broken")
    assert broken.status_code == 500
    assert set(broken.json()["error"]) >= {"message", "type", "code"}
    assert "no such thing" in broken.json()["error"]["message"]
    typed = client.post("/typed", params={"n": "many"})
    assert typed.status_code == 400 and typed.json()["error"]["code"] == "invalid_parameter"
    assert client.post("/typed", params={"n": 3}).json() == {"n": 3}
    # Once a stream has started there is no error answer to give: the stream is cut, and the
    # exception reaches the server (uvicorn logs it), as with Ray's middleware.
    with pytest.raises(ValueError, match="mid-stream"):
        TestClient(app).get("/stream")


def test_the_ingress_reaches_models_over_the_transport_its_own_replica_is_set_to(monkeypatch):
    """Handles arrive pickled with the options of the process that built the app (by reference,
    unless it set RAY_SERVE_USE_GRPC_BY_DEFAULT); the ingress re-options them as its replica's
    environment (REPLICA_ENV) says."""
    from ray.serve._private import constants

    from attune.serve.llm_config import REPLICA_ENV
    from attune.serve.ingress import Ingress

    class Handle:  # records what the ingress asks of a DeploymentHandle
        def __init__(self, **options):
            self.options_given = options

        def options(self, **options):
            return Handle(**options)

    assert REPLICA_ENV["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    for grpc in (True, False):
        monkeypatch.setattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", grpc)
        ingress = Ingress({"tiny-full": Handle()}, {"tiny-full": None})
        assert ingress._default_serve_handles["tiny-full"].options_given == {
            "_by_reference": not grpc}


@pytest.mark.parametrize("source, downloads", [("local", False), ("s3://models/tiny-full", True),
                                               ("attune:tiny-llama", False)])
def test_replicas_skip_rays_download_step_only_for_models_on_disk(tmp_path, source, downloads):
    """Ray's node-init task fetches cloud mirrors; for a directory it is a no-op costing a process.
    attune's own model arrives by name and is built on the replica's node."""
    import asyncio

    from attune.serve.llm_config import llm_configs

    source = str(tmp_path) if source == "local" else source
    config = validate(ServeConfig, {"base_models": [{"id": "m", "name_or_path": source}]}, "args")
    (built,) = llm_configs(config)
    assert built.model_loading_config.model_source == source  # the name, not a path of this node
    callback = built.callback_config.callback_class(llm_config=built)
    asyncio.run(callback.on_before_node_init())
    assert callback.ctx.run_init_node is downloads
    if source == "attune:tiny-llama":
        assert built.get_engine_config().actual_hf_model_id == str(ensure_tiny_llama())


@pytest.mark.parametrize("args, exported", [
    ({}, True), ({"direct_streaming": True}, False),
    ({"direct_streaming": True, "engine": {"ray_metrics": True}}, True),
    ({"engine": {"ray_metrics": False}}, False)])
def test_engine_metrics_go_through_ray_unless_the_endpoint_serves_them(args, exported):
    from attune.serve.llm_config import llm_config

    config = validate(ServeConfig, {"base_models": [TINY], **args}, "args")
    assert llm_config("tiny-full", "/models/tiny-full", config, lora=False).log_engine_metrics is exported


def test_attunes_own_ray_runs_workers_at_normal_priority_and_fits_serve_to_the_cores(monkeypatch):
    from attune.cluster import embedded_cluster_env

    for name in ("RAY_worker_niceness", "RAY_SERVE_HAPROXY_NBTHREAD",
                 "RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "RAY_SERVE_ENABLE_HA_PROXY",
                 "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "RAY_SERVE_HAPROXY_STATS_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = embedded_cluster_env("http://127.0.0.1:8265", cores=2,
                               serve_ports={"RAY_SERVE_HAPROXY_STATS_PORT": "41001"})
    assert env == {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8265", "RAY_worker_niceness": "0",
                   "RAY_SERVE_HAPROXY_NBTHREAD": "1", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
                   "RAY_SERVE_ENABLE_HA_PROXY": "1",
                   "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                   "RAY_SERVE_HAPROXY_STATS_PORT": "41001"}
    assert embedded_cluster_env("u", cores=64)["RAY_SERVE_HAPROXY_NBTHREAD"] == "4"  # Ray's default
    monkeypatch.setenv("RAY_worker_niceness", "10")  # the user's own settings win
    monkeypatch.setenv("RAY_SERVE_HAPROXY_NBTHREAD", "3")
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.1")
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # Serve's Python proxy, if one insists
    user_set = embedded_cluster_env("u", cores=2)
    assert user_set["RAY_worker_niceness"] == "10"
    assert user_set["RAY_SERVE_HAPROXY_NBTHREAD"] == "3"
    assert user_set["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    assert user_set["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_each_cluster_of_attunes_gets_serve_ports_of_its_own():
    """Ray's HAProxy stats and metrics ports and its fallback proxy's, free ones below the
    ephemeral range, so two clusters on one machine do not meet; and they are the variables
    this Ray reads."""
    import inspect
    from itertools import count

    from ray.serve._private import constants

    from attune.cluster import SPARE_PORTS, own_serve_ports

    assert own_serve_ports(count(50000, 1000).__next__) == {
        "RAY_SERVE_HAPROXY_STATS_PORT": "50000", "RAY_SERVE_HAPROXY_METRICS_PORT": "51000",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "52000", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": "53000"}
    ports = own_serve_ports()
    source = inspect.getsource(constants)
    assert all(f'"{name}"' in source for name in ports)
    assert all(int(port) in SPARE_PORTS for port in ports.values())
    assert len(set(ports.values())) == len(ports)


@pytest.mark.parametrize("args, sleep_us", [
    ({}, "20"), ({"accelerator": "gpu"}, None), ({"engine": {"poll_sleep_us": 0}}, None),
    ({"accelerator": "gpu", "engine": {"poll_sleep_us": 50}}, "50")])
def test_engines_on_cpu_wait_for_their_worker_without_spinning(args, sleep_us):
    from attune.serve.llm_config import llm_config
    from attune.serve.vllm_plugin import POLL_SLEEP_ENV

    config = validate(ServeConfig, {"base_models": [TINY], **args}, "args")
    env = llm_config("tiny-full", "/models/tiny-full", config, lora=False).runtime_env["env_vars"]
    assert env.get(POLL_SLEEP_ENV) == sleep_us


@pytest.mark.parametrize("args, executor", [
    ({}, "auto"), ({"engine": {"cpu_executor": "mp"}}, "mp"), ({"accelerator": "gpu"}, None)])
def test_engines_on_cpu_are_told_where_to_run_the_model(args, executor):
    from attune.serve.llm_config import llm_config
    from attune.serve.vllm_plugin import CPU_EXECUTOR_ENV

    config = validate(ServeConfig, {"base_models": [TINY], **args}, "args")
    env = llm_config("tiny-full", "/models/tiny-full", config, lora=False).runtime_env["env_vars"]
    assert env.get(CPU_EXECUTOR_ENV) == executor


@pytest.mark.parametrize("value, cpus, asked, backend", [
    ("auto", 2, None, "uni"), ("auto", 2, "mp", "uni"), ("auto", 8, "mp", "mp"),
    ("uni", 8, "mp", "uni"), ("mp", 2, "mp", "mp"), ("", 2, None, "mp")])
def test_the_plugin_keeps_the_model_in_the_engine_process_where_asked(tiny_base, value, cpus,
                                                                      asked, backend):
    """vLLM's own engine config, made as a server makes it (`vllm serve` asks for no executor,
    Ray Serve LLM for 'mp'), in a fresh process with the plugin loaded by vLLM and a node of
    `cpus` CPUs: vLLM's CPU platform alone always says 'mp'."""
    import os
    import subprocess
    import sys

    from attune.serve.vllm_plugin import CPU_EXECUTOR_ENV

    code = ("import os; os.sched_getaffinity = lambda pid: set(range(%d)); "
            "from vllm.engine.arg_utils import EngineArgs; "
            "config = EngineArgs(model=%r, max_model_len=256, distributed_executor_backend=%r)"
            ".create_engine_config(); "
            "print(config.parallel_config.distributed_executor_backend, "
            "os.environ.get('OMP_NUM_THREADS'))" % (cpus, tiny_base, asked))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code],
                          env={**env, CPU_EXECUTOR_ENV: value, "VLLM_CPU_KVCACHE_SPACE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # the engine process, started from here, computes on one thread where it runs the model
    assert done.stdout.split()[-2:] == [backend, "1" if backend == "uni" else "None"]


def test_a_bad_cpu_executor_in_the_environment_names_the_variable():
    from attune.serve.vllm_plugin import CPU_EXECUTOR_ENV, cpu_executor

    with pytest.raises(ValueError, match=f"{CPU_EXECUTOR_ENV}='ray': expected one of auto, uni, mp"):
        cpu_executor("ray")


@pytest.mark.parametrize("value, waits_with", [("20", "sleep_instead_of_spinning"),
                                               ("", "sched_yield")])
def test_vllm_loads_attunes_plugin_which_acts_only_where_asked(value, waits_with):
    """Through vLLM's own plugin loader, in a fresh process as each of vLLM's is."""
    import os
    import subprocess
    import sys

    from attune.serve.vllm_plugin import POLL_SLEEP_ENV

    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.distributed.device_communicators import shm_broadcast; "
            "print(shm_broadcast.sched_yield.__name__)")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, POLL_SLEEP_ENV: value},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == waits_with


def test_vllms_busy_wait_sleeps_once_the_plugin_is_on(monkeypatch):
    """vLLM's own SpinCondition.wait, in its busy phase (a result read moments ago)."""
    import time

    from vllm.distributed.device_communicators import shm_broadcast

    from attune.serve import vllm_plugin

    monkeypatch.setattr(shm_broadcast, "sched_yield", shm_broadcast.sched_yield)  # undone after
    monkeypatch.setenv(vllm_plugin.POLL_SLEEP_ENV, "20")
    vllm_plugin.register()
    slept = []
    monkeypatch.setattr(vllm_plugin.time, "sleep", slept.append)
    waiting = shm_broadcast.SpinCondition.__new__(shm_broadcast.SpinCondition)
    waiting.is_reader, waiting.last_read, waiting.busy_loop_s = True, time.monotonic(), 60.0
    waiting.wait()
    assert slept == [20e-6]


@pytest.mark.parametrize("value", ["fast", "-5", "nan"])
def test_a_bad_poll_sleep_in_the_environment_names_the_variable(value):
    from attune.serve.vllm_plugin import POLL_SLEEP_ENV, poll_sleep_us

    with pytest.raises(ValueError, match=f"{POLL_SLEEP_ENV}='{value}'"):
        poll_sleep_us(value)


def test_building_the_models_configs_writes_nothing_and_deploying_copies_the_adapters(tmp_path):
    """llm_configs only reads the entries; build_app then puts a LoRA entry where the app loads
    it (promote_adapters: <lora_store>/<base id>/<entry name>/)."""
    import json

    from attune.serve.entries import promote_adapters
    from attune.serve.llm_config import llm_configs

    entry = tmp_path / "registry" / "tiny-lora"
    entry.mkdir(parents=True)
    (entry / "attune.json").write_text(json.dumps({"name": "tiny-lora", "method": "lora",
                                                   "base_model": "attune:tiny-llama",
                                                   "lora": {"rank": 8}}))
    (entry / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ m }}",
                                                             "eos_token": "</s>"}))
    (entry / "adapter_config.json").write_text("{}")
    store = tmp_path / "adapters"
    config = validate(ServeConfig, {"base_models": [TINY], "entries": [str(entry)],
                                    "lora_store": str(store)}, "serve args")
    (base,) = llm_configs(config)
    assert base.model_id == "tiny-llama" and not store.exists()
    promote_adapters(config)
    assert (store / "tiny-llama" / "tiny-lora" / "adapter_config.json").is_file()


def test_one_entry_in_two_spellings_is_one_location(tmp_path, monkeypatch):
    from attune.store import same_location

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert same_location("~/.attune/registry/tiny-full", str(tmp_path / ".attune/registry/tiny-full"))
    assert same_location("registry/tiny-full", str(tmp_path / "registry" / "tiny-full"))
    assert not same_location("~/.attune/registry/tiny-full", "~/.attune/registry/tiny-lora")
    assert same_location("s3://bucket/registry/x", "s3://bucket/registry/x")
    assert not same_location("s3://bucket/registry/x", "s3://bucket/registry/y")
