"""Shared fixtures: one attune home, one in-process Ray cluster, entries trained once per session.

Everything here is real: the Ray cluster, Ray Train runs, the models. Tests that need a
fine-tuned model take `tiny_full_entry` / `tiny_lora_entry` rather than training their own.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import ray
from leftovers import left_behind, mark_session
from multinode import start_cluster, wait_for_dashboard
from postgres import Postgres
from moto.server import ThreadedMotoServer
from ray import serve

from attune.cluster import ensure_ray, free_port, own_serve_ports, spare_ports
from attune.modeling import ensure_tiny_llama
from attune.recipe import load_recipe
from attune.serve import ServeConfig
from attune.serve.local import run
from attune.train.trainer import fine_tune

pytest_plugins = ["timings"]  # tests/artifacts/timings.json: where the suite's time goes

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
SESSION_MARKER = pytest.StashKey[str]()


def pytest_addoption(parser):
    parser.addoption("--image", action="store_true",
                     help="also build the cpu image with podman and run the tests marked image "
                          "inside it (minutes; tests/test_image.py)")


def pytest_collection_modifyitems(config, items):
    """Tests marked image need --image: deselected without it, not skipped (they are not
    missing a machine's hardware, only the time for a build)."""
    if config.getoption("--image"):
        return
    deselected = [item for item in items if item.get_closest_marker("image")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("image")]


def pytest_sessionstart(session):
    # Started in the background by a non-interactive shell (a CI runner, `make test &`), this
    # process and every command it starts would ignore SIGINT: no Ctrl-C test could pass, and
    # `ray start --block` heads would wait out their stop timeouts. As from a terminal instead:
    # a handled signal is default again in each child once it execs.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    marker = session.config.stash[SESSION_MARKER] = mark_session()
    # A session that crashes (pytest's INTERNALERROR skips pytest_sessionfinish) still ends
    # everything it started; after a normal finish nothing is left for this to find.
    atexit.register(lambda: left_behind(marker, grace_s=0, cwd=REPO))


def pytest_sessionfinish(session, exitstatus):
    """Nothing the session started may outlive it: fail, naming what was left (then killed)."""
    if session.config.option.collectonly:
        return
    left = left_behind(session.config.stash[SESSION_MARKER], cwd=REPO)
    if left:
        lines = "\n".join(f"  {pid}: {command}" for pid, command in sorted(left.items()))
        session.config.get_terminal_writer().line(
            f"\nprocesses the test session left running (now killed):\n{lines}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def ray_auth_token(tmp_path_factory) -> Path:
    """A Ray auth token of the session's own, for every cluster it starts and every client.

    `ray start --head` with token auth needs a token that already exists; an in-process
    `ray.init` writes one to ~/.ray, `ray start` does not. So on a machine where Ray never ran,
    the session's heads would fail unless an earlier in-process cluster had left one behind.
    """
    path = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    path.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def attune_home(tmp_path_factory) -> Path:
    """A fresh ATTUNE_HOME for the session (set before Ray starts, so workers inherit it)."""
    home = tmp_path_factory.mktemp("attune-home")
    os.environ["ATTUNE_HOME"] = str(home)
    os.chdir(REPO)  # recipes name data files relative to the repo
    return home


API_KEY = "test-key-0123456789"


@pytest.fixture(scope="session")
def object_store(attune_home):
    """A real S3 API on loopback (moto's server), for what production keeps in s3://: the LoRA
    adapters a running app loads. Its address goes into the environment before Ray starts."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3").create_bucket(Bucket="attune")
    yield "s3://attune"
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(attune_home, object_store):
    """One in-process Ray for the whole session, with logical CPUs to spare."""
    os.environ["ATTUNE_API_KEYS"] = API_KEY  # serving replicas read it from their environment
    # Logical CPUs are accounting, not cores: Serve replicas, Train workers and Tune trials all
    # hold some while mostly waiting, and one session runs them side by side.
    ensure_ray(num_cpus=16)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_base(attune_home) -> str:
    return str(ensure_tiny_llama())


def train(recipe_path: str, *overrides: str) -> str:
    return fine_tune(load_recipe(REPO / recipe_path, list(overrides)))


@pytest.fixture(scope="session")
def tiny_full_entry(ray_cluster) -> str:
    """The tiny model fully fine-tuned on the bundled Q&A (2 DDP workers, as `make demo` does)."""
    return train("recipes/tiny-full.yaml")


@pytest.fixture(scope="session")
def tiny_lora_entry(ray_cluster) -> str:
    """A LoRA adapter on the tiny model."""
    return train("recipes/tiny-lora.yaml")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL on a loopback port, from initdb in a temporary directory
    (tests/postgres.py); stopped and removed at the end of the session."""
    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def feedback_db(request, tmp_path) -> str:
    """A fresh, empty feedback database URL: a sqlite file, or a database on the session's server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/feedback.db"
    return request.getfixturevalue("postgres").create_database(f"t{secrets.token_hex(6)}")


@dataclass
class RayHead:
    gcs: str  # host:port, for RAY_ADDRESS
    dashboard: str  # http://host:port, for `ray job submit` and `serve deploy`
    temp_dir: str  # its sessions, logs included


@contextmanager
def ray_start_head(**env_vars: str):
    """A separate `ray start --head` cluster, as on a real cluster, with `env_vars` in its
    environment from the start.

    Started with --block in its own process group so that the teardown stops this cluster
    alone (`ray stop` would also kill the session's in-process Ray), and with a temp dir of its
    own: Ray's job supervisor finds its cluster through `ray_current_cluster` in the temp dir,
    which the last `ray start` on the machine writes, so two heads sharing /tmp/ray would send
    one's jobs to the other.
    """
    temp_dir = tempfile.mkdtemp(prefix="ray-head-")
    spare = spare_ports()  # each port once, none that an outgoing connection can take meanwhile
    gcs, dashboard = next(spare), next(spare)
    # Every port of its own: the session's in-process Ray already holds the default agent ports.
    ports = [f"--{flag}={next(spare)}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    ray_bin = Path(sys.executable).with_name("ray")
    # and its HAProxy's and fallback proxy's, where it runs them: so does the session's Ray
    env = {**os.environ, **own_serve_ports(spare.__next__), **env_vars,
           # the venv's bin on PATH, so that job entrypoints find `python -m attune` and `attune`
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           # its workers' State API (Train's PlacementGroupCleaner) would else read the default
           # temp dir's ray_current_cluster: another cluster's, or none (attune.cluster.ensure_ray)
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    log = Path(temp_dir) / "ray-start.log"
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=16",
         f"--temp-dir={temp_dir}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
         *ports],
        env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(address, proc, log)
    except RuntimeError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it died before its cluster came up: nothing left
            pass
        raise
    try:
        yield RayHead(f"127.0.0.1:{gcs}", address, temp_dir)
    finally:
        # Ctrl-C, which `ray start --block` waits for: it stops the cluster in about 2 s, while
        # a SIGTERM went unanswered for the whole 30 s timeout (measured).
        stop_group(proc, signal.SIGINT, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_group(proc, sig: int, timeout: float) -> None:
    """Signal the process group of `proc` (started with start_new_session); SIGKILL what is
    still there after `timeout` seconds."""
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")  # gone with its module: an idle cluster slows every later test
def ray_head(attune_home):
    """A `ray start --head` cluster with token auth and Serve's HAProxy (as the RayService's
    pods); yields its dashboard address. Its ingress replicas drain for 2 s, not Ray's 30, when
    Serve shuts down: no outside load balancer here to wait for."""
    with ray_start_head(RAY_AUTH_MODE="token", RAY_SERVE_ENABLE_HA_PROXY="1",
                        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="2") as head:
        yield head.dashboard


@pytest.fixture(scope="module")  # three idle Ray nodes would slow every later test
def multinode(object_store, ray_auth_token):
    """A head with no CPUs and two worker nodes with private disks (tests/multinode.py), set up
    as the RayService's pods are (Serve's HAProxy); the S3 store's endpoint in every node's
    environment, as the pods' envFrom gives it."""
    root = Path(tempfile.mkdtemp(prefix="attune-", dir="/var/tmp"))
    store_env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    cluster = start_cluster(root, ray_auth_token.read_text(), store_env,
                            RAY_SERVE_ENABLE_HA_PROXY="1",
                            RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="2")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """The HTTP port of the session's Serve: every app on the in-process Ray shares its one
    proxy, which keeps the port of Serve's first start."""
    return free_port()


@dataclass
class ServedEndpoint:
    base_url: str  # ends in /v1
    api_key: str
    base_model_id: str
    finetuned_model_id: str
    lora_model_id: str
    config: object  # the ServeConfig it was built from


@pytest.fixture(scope="session")
def served_endpoint(ray_cluster, serve_port, object_store, tiny_full_entry, tiny_lora_entry):
    """attune's real endpoint: Ray Serve + vLLM (CPU) serving the tiny base model, its full
    fine-tune and its LoRA adapter (multi-LoRA), behind API-key auth."""
    config = ServeConfig(
        base_models=[{"id": "tiny-llama", "name_or_path": "attune:tiny-llama"}],
        entries=[tiny_full_entry, tiny_lora_entry],
        lora_store=f"{object_store}/adapters",
        # engine settings left at their defaults, as in the RayService and direct-streaming
        # tests: an engine of the same model and settings loads vLLM's compiled model from its
        # cache instead of compiling it again
        # room for the 64 concurrent streams of test_serve, and a burst of twice this meets the
        # limit (no second app, with an engine of its own, just for the overload test)
        max_ongoing_requests=16, max_queued_requests=64,
    )
    endpoint = run(config, port=serve_port)
    yield ServedEndpoint(endpoint.base_url, API_KEY, "tiny-llama", "tiny-full",
                         "tiny-llama:tiny-lora", config)
    serve.shutdown()
