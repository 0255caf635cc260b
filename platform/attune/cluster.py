"""Starting or joining Ray: the cluster that training, tuning and serving run on.

    ensure_ray()          # RAY_ADDRESS (or a Ray job's cluster) when set, else Ray in-process
    exit_now(130)         # Ctrl-C: the process ends at once, a cluster it started with it

With no cluster to join, attune starts a whole one inside this process, sized and set up for
the user's one machine: logical CPUs beyond the cores, Serve behind HAProxy, and ports of its
own so that it never meets another cluster on the same machine.
"""

from __future__ import annotations

import atexit
import os
import random
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import NoReturn

import ray
import ray.data
from ray.util.debug import log_once

from attune import console
from attune.addresses import check_answers
from attune.config import ConfigError
from attune.ray_internals import canonicalize_bootstrap_address_or_die

# Where the State API looks first for a cluster's dashboard (ray.dashboard.utils).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Serve's switch for its HAProxy ingress; its controller and proxies read it once, at start.
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"

# Ports for servers that start later than they are chosen: below the kernel's ephemeral range
# (32768-60999 by default), where outgoing connections and Ray's own listeners could take a
# port between its choice and its use.
SPARE_PORTS = range(20000, 32000)
# Ray's ports where an address names none: the head's GCS, and its Ray Client server.
GCS_PORT, RAY_CLIENT_PORT = 6379, 10001


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS when set (or when running as a Ray job), else start Ray in-process."""
    # Ray Data's progress bars flood the logs of a job whose datasets are tiny.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # Ray Data's warning that they are: on purpose
    if ray.is_initialized():
        return
    console.quiet()
    if os.environ.get("RAY_ADDRESS"):
        check_cluster_answers(os.environ["RAY_ADDRESS"])
        ray.init(log_to_driver=True, logging_level=console.ray_log_level())
        console.say_where_logs_are()
        return
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            _start_embedded(num_cpus)
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this one
            if NODE_START_TIMEOUT not in str(e) or attempt == START_ATTEMPTS:
                raise
            _kill_ray_processes_started_here()
            print(f"[attune] Ray's node did not register within Ray's fixed 30 s (a busy "
                  f"machine?); starting it again ({attempt + 1}/{START_ATTEMPTS})", flush=True)
    global _embedded
    _embedded = True
    atexit.register(_exit_now_after_ctrl_c)  # runs before Ray's own shutdown hook (LIFO)
    console.say_where_logs_are()


# Whether ensure_ray started Ray in this process: its processes are this process's to end.
_embedded = False
# Ray gives a new node a fixed 30 s to register with its GCS and raises this when it has not;
# on a loaded machine (a laptop compiling, a shared CI runner) it may just need longer.
NODE_START_TIMEOUT = "The current node timed out during startup"
START_ATTEMPTS = 3


def _start_embedded(num_cpus: int | None) -> None:
    dashboard_port = free_port()
    env = embedded_cluster_env(f"http://127.0.0.1:{dashboard_port}", serve_ports=own_serve_ports())
    with _set_for_ray_init(env):
        # Logical CPUs beyond the cores: Train's workers, Data's tasks and Serve's actors each
        # claim one while mostly waiting on each other. address="local": a new cluster, never
        # one that `ray start` left running on this machine.
        ray.init(address="local", num_cpus=num_cpus or max(6, 2 * (os.cpu_count() or 1)),
                 dashboard_port=dashboard_port, log_to_driver=True,
                 logging_level=console.ray_log_level())


def _kill_ray_processes_started_here() -> None:
    """What a failed start left: Ray's daemons below this process, with the agents and workers
    they started (the node object that would stop them was never made). Only processes run
    from Ray's own package and theirs: a library user's other children stay."""
    import psutil  # Ray's own copy (ray/thirdparty_files) if no other: importable once ray is

    ray_dir = os.path.dirname(ray.__file__)
    for process in psutil.Process().children():
        with suppress(psutil.Error):
            if any(ray_dir in part for part in process.cmdline()):
                for below in [*process.children(recursive=True), process]:
                    with suppress(psutil.Error):
                        below.kill()


def started_here() -> bool:
    """Whether this process started the cluster it runs on (no RAY_ADDRESS to join)."""
    return _embedded


def exit_now(code: int) -> NoReturn:
    """End this process at once, as a Ctrl-C asks. A cluster it started is killed with it, not
    shut down: Serve drains each replica, Ray waits on each of its daemons and the interpreter
    unloads torch and vLLM, which together take many seconds. A joined cluster ends this driver's tasks and
    actors itself when the driver is gone."""
    if _embedded:
        _kill_processes_started_here()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_now_after_ctrl_c() -> None:
    """At exit, where a Ctrl-C ended the program (an uncaught KeyboardInterrupt: a script that
    trained or serves through attune, as well as attune's own commands)."""
    if isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
        exit_now(130)


def _kill_processes_started_here() -> None:
    """SIGKILL every process below this one: Ray's daemons and workers, vLLM's engines, Serve's
    HAProxy. Each is stopped first, until none is left to start another, since a process whose
    parent died is no longer found below this one."""
    import psutil  # Ray's own copy (ray/thirdparty_files) if no other: importable once ray is

    stopped: dict[int, psutil.Process] = {}
    while found := [p for p in psutil.Process().children(recursive=True) if p.pid not in stopped]:
        for process in found:
            with suppress(psutil.Error):
                process.suspend()
            stopped[process.pid] = process
    for process in stopped.values():
        with suppress(psutil.Error):
            process.kill()


def check_cluster_answers(address: str) -> None:
    """Fail in seconds where no cluster answers at `address` (RAY_ADDRESS): `ray.init` would log
    "Failed to connect to GCS" for minutes. host[:port] is a GCS, ray://host[:port] a Ray Client
    server, `auto` the cluster `ray start` last started on this machine, `local` a new one."""
    key = f"RAY_ADDRESS={address}"
    if address.startswith(("http://", "https://")):  # Ray refuses it, in a traceback
        raise ConfigError(f"{key}: a dashboard's address, as `attune submit --address` takes; "
                          f"to join a cluster, name its GCS (host:{GCS_PORT}) or its Ray Client "
                          f"server (ray://host:{RAY_CLIENT_PORT})")
    if address == "local" or ("://" in address and not address.startswith("ray://")):
        return  # a new cluster, or a scheme of a Ray plugin
    if address == "auto":
        address = _auto_address(key)
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # no port given: the server's default one
        host, port = address.removeprefix("ray://"), RAY_CLIENT_PORT if client else GCS_PORT
    check_answers(host.strip("[]"), int(port), key,
                  "no Ray Client server" if client else "no Ray cluster",
                  "; start one (`ray start --head`), or unset RAY_ADDRESS to run Ray in this "
                  "process")


def _auto_address(key: str) -> str:
    """The GCS address `auto` stands for: the last `ray start`'s, else the one running GCS's."""
    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as e:  # none found, or several: Ray's first sentence says which
        raise ConfigError(f"{key}: {str(e).split('. ')[0]}; set RAY_ADDRESS to a cluster's "
                          "host:port, or unset it to run Ray in this process") from None


def embedded_cluster_env(dashboard_url: str, cores: int | None = None,
                         serve_ports: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an in-process cluster, where the workers are the user's job; the raylet
    hands it to every worker. The user's own value of each variable wins.

    RAY_API_SERVER_ADDRESS: the State API (Train's PlacementGroupCleaner) finds this cluster
      here; else it reads the last `ray start`'s address file, another cluster's or a dead one.
    RAY_worker_niceness: Ray starts workers at nice 15, below everything else on a shared node;
      here they are the job (vLLM engines, Train workers), so they run at 0.
    RAY_SERVE_HAPROXY_NBTHREAD: one HAProxy thread per two cores (Ray's 4 suit a big node).
    RAY_SERVE_CONTROL_LOOP_INTERVAL_S: Serve's controller reconciles every 0.5 s, not 0.1 s:
      about half its idle CPU, for replacing a dead replica 0.4 s later at most.
    RAY_SERVE_ENABLE_HA_PROXY: HAProxy in front of the ingress replicas, which answer HTTP
      themselves: one Python process fewer on every streamed token; direct streaming needs it.
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S: 2 s, not 30, for an ingress replica to drain
      when told to stop: only the node's own HAProxy sends it requests, and it retries.
    `serve_ports` (own_serve_ports): the ports of Serve's HAProxy and its fallback proxy.
    """
    cores = cores or os.cpu_count() or 1
    defaults = {"RAY_worker_niceness": "0",
                "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, cores // 2))),
                "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
                HA_PROXY_ENV: "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                **(serve_ports or {})}
    return {API_SERVER_ENV: dashboard_url,
            **{name: os.environ.get(name, value) for name, value in defaults.items()}}


def own_serve_ports(next_port: Callable[[], int] | None = None) -> dict[str, str]:
    """Ports of Serve's HAProxy (stats, metrics) and its fallback proxy (HTTP, gRPC) for a cluster
    on a machine that may run another: Ray's fixed defaults let a second HAProxy fail to bind, or
    send requests to the other cluster's proxy."""
    next_port = next_port or spare_ports().__next__
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(next_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(next_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(next_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(next_port())}


def spare_ports() -> Iterator[int]:
    """Free ones of SPARE_PORTS, in random order, each once."""
    for port in random.sample(SPARE_PORTS, len(SPARE_PORTS)):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # fails if any address of the machine holds it
            except OSError:
                continue
        yield port


def free_port() -> int:
    return next(spare_ports())


@contextmanager
def _set_for_ray_init(variables: dict[str, str]):
    """Set variables for `ray.init` only: the raylet hands its environment to every worker it
    starts, but this driver's own subprocesses (`ray job submit` to another cluster) must not
    inherit them."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
