"""A Ray cluster of separate nodes on one machine, shaped like the KubeRay manifests' clusters.

    python tests/multinode.py            # or `make cluster`: starts one, prints how to use it

- a head started with `--num-cpus 0` (no user code runs there), in this machine's own mounts,
  where the drivers run (`attune train`, `ray job submit`, `serve deploy`), as on a head pod;
- worker nodes, each in a mount namespace of its own (`unshare -m`): a private tmpfs over
  ATTUNE_HOME, /dev/shm (its own object store) and its scratch, which holds its HOME and TMPDIR
  (and over all of /tmp where the checkout and Python live elsewhere), so a node sees none of
  another node's files, only
- the store every node sees, the two ways the overlays provide one: a directory at the same path
  on every node (the cpu overlay's volume) and an S3 bucket (the gpu overlay's), here moto's server.

Clients and servers of the tests use loopback; Ray itself advertises its nodes at the machine's
own address (it resolves a loopback --node-ip-address to that, by design), so its traffic stays
on this machine. Every process of a node lives in its mount namespace, which is how `kill_node`
finds them all (its raylet, workers, engines) and how the teardown leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CPUS_PER_NODE = 6  # logical CPUs: Train workers, Data tasks and Serve replicas mostly wait
NODE_RESOURCE = "attune-node:"

# Inside the node's namespace: private mounts first, then the raylet (exec keeps the pid).
NODE_SCRIPT = """set -e
if [ "$NODE_PRIVATE_TMP" = 1 ]; then mount -t tmpfs tmpfs /tmp; fi
for d in "$ATTUNE_HOME" "$NODE_SCRATCH" /dev/shm; do
  mkdir -p "$d" && mount -t tmpfs tmpfs "$d"
done
exec "$@"
"""


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    namespace: str  # /proc/PID/ns/mnt of its processes
    log: Path

    def pids(self) -> list[int]:
        """Every process of this node: those in its mount namespace."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "mnt") == self.namespace:
                        found.append(int(entry.name))
                except OSError:  # ended meanwhile
                    pass
        return found

    def sees(self, path: str | Path) -> bool:
        """Whether `path` exists as this node sees it (through its raylet's root)."""
        return Path(f"/proc/{self.process.pid}/root{path}").exists()


@dataclass
class LocalCluster:
    root: Path  # this cluster's files: the head's temp dir, the shared store, node logs
    env: dict[str, str]  # for drivers and clients: RAY_ADDRESS, auth, the S3 endpoint
    gcs: str
    dashboard: str  # http://127.0.0.1:PORT: `ray job submit --address`, `serve deploy --address`
    head: subprocess.Popen
    nodes: list[Node] = field(default_factory=list)
    _ports: object = None
    _node_env: dict = field(default_factory=dict)

    @property
    def shared(self) -> Path:
        """The directory every node sees at the same path (the cpu overlay's volume)."""
        return self.root / "shared"

    def start_node(self, name: str) -> Node:
        ports = self._ports
        scratch = self.root / name
        # all of /tmp, unless the checkout or Python lives there
        private_tmp = not any(str(p).startswith("/tmp/")
                              for p in (REPO, BIN, Path(sys.executable).resolve()))
        log = self.root / f"{name}.log"
        min_worker = next(ports)
        # the node's other ports outside its own workers' range
        ports = (port for port in ports if not min_worker <= port <= min_worker + 60)
        env = {**self._node_env, "NODE_SCRATCH": str(scratch / "tmp"),
               "NODE_PRIVATE_TMP": "1" if private_tmp else "0",
               "TMPDIR": str(scratch / "tmp"), "HOME": str(scratch / "tmp" / "home"),
               **_serve_ports(ports)}
        command = [str(BIN / "ray"), "start", "--block", f"--address={self.gcs}",
                   # short: Ray's socket paths under it must stay within 107 bytes
                   f"--num-cpus={CPUS_PER_NODE}", f"--temp-dir={scratch / 'tmp' / 'r'}",
                   "--object-store-memory=1000000000", "--disable-usage-stats",
                   # a resource named after the node: how tests tell which node ran what
                   f"--resources={json.dumps({NODE_RESOURCE + name: 1})}",
                   f"--min-worker-port={min_worker}", f"--max-worker-port={min_worker + 60}",
                   *[f"--{flag}={next(ports)}" for flag in _NODE_PORT_FLAGS]]
        process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", NODE_SCRIPT, name, *command],
            env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)
        time.sleep(0.2)
        node = Node(name, process, os.readlink(f"/proc/{process.pid}/ns/mnt"), log)
        self.nodes.append(node)
        self._wait_for_nodes()
        return node

    def kill_node(self, node: Node) -> None:
        """A lost node: its raylet and every process on it, killed at once."""
        for _ in range(5):  # processes forked while the first ones died
            pids = node.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        node.process.wait()
        self.nodes.remove(node)

    def stop(self) -> None:
        for node in list(self.nodes):
            node.process.send_signal(signal.SIGINT)  # `ray start --block` stops its node
        deadline = time.time() + 30
        for node in list(self.nodes):
            try:
                node.process.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            self.kill_node(node)
        os.killpg(self.head.pid, signal.SIGINT)
        try:
            self.head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.head.pid, signal.SIGKILL)
            self.head.wait()

    def submit(self, entrypoint: str, timeout_s: float = 900, **env_vars: str) -> str:
        """`ray job submit ... -- ENTRYPOINT`: what KubeRay's submitter pod runs (K8sJobMode)
        and what users run against a cluster. `env_vars` are the job's (a pod's ConfigMap
        values); a shell expands the entrypoint's ${VARS} with them first, as the submitter's
        does. Returns the job's logs; fails the test unless the job succeeded."""
        from attune.submit import runtime_env

        env = runtime_env()
        env["env_vars"].update(env_vars)
        submission_id = f"test-{uuid.uuid4().hex[:8]}"
        submit = (f"{BIN / 'ray'} job submit --address {self.dashboard} --submission-id "
                  f"{submission_id} --runtime-env-json {shlex.quote(json.dumps(env))} -- {entrypoint}")
        try:
            done = subprocess.run(["bash", "-c", submit], env={**self.env, **env_vars}, cwd=REPO,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            subprocess.run([str(BIN / "ray"), "job", "stop", "--address", self.dashboard,
                            submission_id], env=self.env, capture_output=True, timeout=60)
            raise AssertionError(f"{entrypoint}: still running after {timeout_s} s") from None
        assert done.returncode == 0, f"{entrypoint}:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
        assert f"Job '{submission_id}' succeeded" in done.stdout
        return done.stdout

    def list_state(self, kind: str, **filters: str) -> list[dict]:
        """`ray list KIND` of this cluster (dead actors included), as dicts."""
        command = [str(BIN / "ray"), "list", kind, "--address", self.dashboard, "--format", "json",
                   "--detail", "--limit", "10000"]
        for key, value in filters.items():
            command += ["--filter", f"{key}={value}"]
        out = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        if out.stdout.startswith("No resource"):  # what it prints instead of an empty list
            return []
        return json.loads(out.stdout)

    def node_names(self) -> dict[str, str]:
        """Ray node id -> 'head' or the worker node's name, for every node the cluster had."""
        names = {}
        for row in self.list_state("nodes"):
            own = [r.removeprefix(NODE_RESOURCE) for r in row.get("resources_total", {})
                   if r.startswith(NODE_RESOURCE)]
            names[row["node_id"]] = "head" if row["is_head_node"] else own[0]
        return names

    def nodes_of_actors(self, class_name: str) -> list[str]:
        """The names of the nodes that ran the actors of `class_name` (one per actor)."""
        names = self.node_names()
        return [names.get(a["node_id"], "?") for a in self.list_state("actors", class_name=class_name)]

    def _wait_for_nodes(self, timeout_s: float = 300) -> None:  # minutes when loaded
        deadline = time.time() + timeout_s
        while True:
            alive = [r for r in self.list_state("nodes", state="ALIVE") if not r["is_head_node"]]
            if len(alive) >= len(self.nodes):
                return
            dead = [n for n in self.nodes if n.process.poll() is not None]
            if dead or time.time() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.log.read_text()[-3000:]}" for n in self.nodes)
                raise RuntimeError(f"worker nodes did not join the cluster:\n{logs}")
            time.sleep(1)


_NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")


def _serve_ports(ports) -> dict[str, str]:
    """Each node's HAProxy and fallback proxy ports: the nodes share one network here."""
    from attune.cluster import own_serve_ports

    return own_serve_ports(ports.__next__)


def start_cluster(root: Path, token: str, store_env: dict[str, str], workers: int = 2,
                  **cluster_env: str) -> LocalCluster:
    """A head with no CPUs and `workers` worker nodes, each with private disks.

    `token`: the cluster's Ray auth token. `store_env`: what every pod's envFrom gives (the S3
    endpoint and credentials). `cluster_env`: set on every node (the manifests' container env).
    """
    from attune.cluster import spare_ports

    root.mkdir(parents=True, exist_ok=True)
    (root / "shared").mkdir(exist_ok=True)
    ports = spare_ports()
    gcs, dashboard_port = next(ports), next(ports)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    base = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN_PATH"}
    base.setdefault("ATTUNE_HOME", str(Path.home() / ".attune"))
    common = {**base, **store_env, **cluster_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
              "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
              # the State API of its workers (Train's placement-group cleaner) finds it here
              "RAY_API_SERVER_ADDRESS": dashboard}
    head_log = root / "head.log"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=0",
         f"--temp-dir={root / 'head'}", f"--dashboard-port={dashboard_port}",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats",
         f"--ray-client-server-port={next(ports)}",
         *[f"--{flag}={next(ports)}" for flag in _NODE_PORT_FLAGS]],
        env={**common, **_serve_ports(ports)}, start_new_session=True,
        stdout=head_log.open("w"), stderr=subprocess.STDOUT)
    cluster = LocalCluster(root, {**common, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, f"127.0.0.1:{gcs}",
                           dashboard, head, _ports=ports, _node_env=common)
    try:
        wait_for_dashboard(dashboard, head, head_log)
        for i in range(workers):
            cluster.start_node(f"worker-{i + 1}")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for_dashboard(address: str, head: subprocess.Popen, log: Path) -> None:
    """Until the head's dashboard answers (`ray job submit` and `serve deploy` talk to it);
    minutes on a loaded machine, seconds on an idle one."""
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 under token auth: it is up
            return
        except OSError:
            if time.time() > deadline or head.poll() is not None:
                raise RuntimeError(f"the head did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(1)


def main() -> None:
    import secrets

    root = Path(tempfile.mkdtemp(prefix="attune-", dir="/var/tmp"))
    token = secrets.token_hex(32)
    try:
        cluster = start_cluster(root, token, {})
    except BaseException:
        subprocess.run(["rm", "-rf", str(root)])
        raise
    print(f"""A head (no CPUs) and {len(cluster.nodes)} worker nodes with private disks, under {root}.
Use it from this machine (the head's):
  export RAY_ADDRESS={cluster.gcs} RAY_AUTH_MODE=token RAY_AUTH_TOKEN={token}
  attune train recipes/tiny-full.yaml output.registry={cluster.shared}/registry output.runs={cluster.shared}/runs
  ray job submit --address {cluster.dashboard} --working-dir . -- attune train recipes/tiny-lora.yaml \\
      output.registry={cluster.shared}/registry output.runs={cluster.shared}/runs
{cluster.shared} is the directory every node sees. Ctrl-C stops the cluster.""", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or `kill`: stop the nodes first
        signal.signal(sig, signal.default_int_handler)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(root)])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "platform"))
    main()
