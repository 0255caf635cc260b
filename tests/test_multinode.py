"""attune on a cluster of separate nodes (tests/multinode.py): a head with no CPUs, two worker
nodes that share no local disk, and the two stores the overlays use.

    pytest tests/test_multinode.py

The k8s overlays' own commands run here as rendered: both RayJob entrypoints through `ray job
submit` (what KubeRay's submitter runs), each overlay's serveConfigV2 through `serve deploy`
(what a RayService hands Ray), each with its store: the shared directory for cpu, S3 for gpu.
A worker node is lost mid-training and under serving; the work goes on on what is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from multinode import CPUS_PER_NODE
from running import ATTUNE, Command

from attune import k8s, registry
from attune.cluster import free_port
from attune.evaluate.greedy_answers import qa_pairs
from attune.ui.passwords import add_user

REPO = Path(__file__).resolve().parents[1]
SERVE = str(Path(sys.executable).with_name("serve"))
pytestmark = pytest.mark.slow

QUICK = (" optim.max_steps=10 optim.warmup_steps=1 eval.every_steps=10 checkpoint.every_steps=10"
         " scaling.placement=spread")
# A lost node's replica is back within this (a vLLM engine start on the surviving node).
REPLICA_BACK_WITHIN_S = 300


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict[str, dict]]:
    """overlay -> RayJob name -> the RayJob, as `attune k8s render` has it."""
    return {overlay: {d["metadata"]["name"]: d for d in k8s.render(REPO, overlay, check=True)
                      if d["kind"] == "RayJob"} for overlay in ("cpu", "gpu")}


@pytest.fixture(scope="module")
def stores(multinode) -> dict[str, str]:
    """Each overlay's ATTUNE_STORE: the cpu overlay's volume (a directory every node mounts at
    the same path) and the gpu overlay's bucket, as its model-store ConfigMap names it."""
    bucket = "attune-models"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return {"cpu": str(multinode.shared / "models"), "gpu": f"s3://{bucket}/attune"}


def nodes_that_ran(cluster, class_prefix: str, **filters: str) -> list[str]:
    """The node of each actor whose class starts with `class_prefix` (dead ones too)."""
    names = cluster.node_names()
    return [names.get(a["node_id"], "?") for a in cluster.list_state("actors", **filters)
            if a["class_name"].startswith(class_prefix)]


def finetune_job(cluster, jobs, stores, overlay: str, overrides: str) -> tuple[str, str]:
    """The overlay's fine-tune RayJob, quick, with its store: (its entry, its logs)."""
    entrypoint = jobs[overlay]["attune-finetune"]["spec"]["entrypoint"] + QUICK + overrides
    logs = cluster.submit(entrypoint, ATTUNE_STORE=stores[overlay])
    entry = f"{stores[overlay]}/registry/tiny-full"
    assert f"registry entry: {entry}" in logs
    assert logs.count("[attune] step 10/10 |") == 1, logs[-3000:]  # each progress line once
    return entry, logs


@pytest.fixture(scope="module")
def cpu_entry(multinode, jobs, stores) -> str:
    """The cpu overlay's fine-tune RayJob, with FSDP across both worker nodes."""
    entry, logs = finetune_job(multinode, jobs, stores, "cpu", " scaling.strategy=fsdp")
    # on 2 worker nodes, the local paths must be a shared directory: said, not guessed
    assert "local paths on a cluster of 2 nodes, so every node must mount them" in logs
    return entry


def test_finetune_job_trains_on_both_worker_nodes_and_leaves_its_entry_on_the_store(multinode, cpu_entry):
    assert sorted(nodes_that_ran(multinode, "RayTrainWorker")) == ["worker-1", "worker-2"]
    # each node built the base model itself: none was handed a path only the head has
    home = os.environ["ATTUNE_HOME"]
    assert all(node.sees(f"{home}/models/tiny-llama/config.json") for node in multinode.nodes)
    manifest = registry.read_manifest(cpu_entry)
    assert manifest["recipe"]["scaling"]["strategy"] == "fsdp"
    assert Path(cpu_entry, "model.safetensors").is_file()


@pytest.fixture(scope="module")
def gpu_entry(multinode, jobs, stores) -> str:
    """The gpu overlay's fine-tune RayJob on CPUs (DDP), its checkpoints and entry in S3."""
    entry, logs = finetune_job(multinode, jobs, stores, "gpu", " scaling.gpus_per_worker=0")
    assert "local paths on a cluster" not in logs
    return entry


def test_finetune_job_of_the_gpu_overlay_keeps_everything_in_the_bucket(gpu_entry):
    manifest = registry.read_manifest(gpu_entry)
    assert manifest["recipe"]["scaling"]["strategy"] == "ddp"
    fs, path = registry.filesystem(gpu_entry.rsplit("/registry/", 1)[0] + "/runs/tiny-full")
    assert fs.get_file_info(path).type.name == "Directory"  # where a retried job resumes from


def test_tune_job_spreads_trials_over_both_worker_nodes(multinode, jobs, stores):
    before = {a["actor_id"] for a in multinode.list_state("actors")}
    entrypoint = jobs["cpu"]["attune-tune"]["spec"]["entrypoint"] + (
        " num_samples=2 scheduler.type=fifo budget.max_concurrent_trials=2"
        # long enough that the second trial starts while the first still trains
        " optim.max_steps=150 eval.every_steps=50 checkpoint.every_steps=150"
        # a trial's worker takes most of a node: two at a time need both nodes
        f" scaling.cpus_per_worker={CPUS_PER_NODE - 2}")
    logs = multinode.submit(entrypoint, ATTUNE_STORE=stores["cpu"])
    entry = f"{stores['cpu']}/registry/tiny-full-asha"
    assert f"registry entry: {entry}" in logs
    assert registry.read_manifest(entry)["tune"]["best"] is True
    names = multinode.node_names()
    trials = [names.get(a["node_id"], "?") for a in multinode.list_state("actors")
              if a["class_name"].startswith("RayTrainWorker") and a["actor_id"] not in before]
    assert sorted(set(trials)) == ["worker-1", "worker-2"], trials


@pytest.fixture(scope="module")
def lora_entry(multinode, stores, tmp_path_factory) -> str:
    """`attune train` on the head (a driver joining the cluster), a LoRA run that loses a worker
    node after its first checkpoint and finishes on the other."""
    tmp = tmp_path_factory.mktemp("lora")
    train = Command([*ATTUNE, "train", "recipes/tiny-lora.yaml", "optim.max_steps=40",
                     "optim.warmup_steps=1", "eval.every_steps=10", "checkpoint.every_steps=10",
                     "scaling.placement=spread", f"output.registry={stores['cpu']}/registry",
                     f"output.runs={stores['cpu']}/runs"], tmp, **multinode.env)
    try:
        train.wait_for("[attune] step 20/40", timeout=900)
        lost = multinode.nodes[-1]
        multinode.kill_node(lost)
        train.proc.wait(timeout=900)
    finally:
        if train.proc.poll() is None:
            train.proc.kill()
    output = train.all_output()
    assert train.proc.returncode == 0, output[-4000:]
    multinode.start_node(lost.name)  # the cluster as it was, for the tests after this one
    return f"{stores['cpu']}/registry/tiny-lora"


def test_training_goes_on_from_its_last_checkpoint_when_a_worker_node_is_lost(multinode, lora_entry):
    history = registry.read_manifest(lora_entry)["history"]
    steps = [h["step"] for h in history]
    # the run ended, each step reported once: the restarted group resumed where the checkpoint was
    assert steps == sorted(set(steps)) and steps[-1] == 40, steps
    assert len(nodes_that_ran(multinode, "RayTrainWorker")) > 2  # a second worker group ran


def serve_config(overlay: str, port: int, store: str, shared: Path, **llm_args) -> dict:
    """The overlay's serveConfigV2 as it deploys here: the Secrets' mounts on the shared
    directory, the proxy on the head alone (the nodes share one network here; on Kubernetes
    each pod has its own address), loopback only."""
    config = k8s.serve_config(REPO, overlay)
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["proxy_location"] = "HeadOnly"
    keys, users = shared / "api-keys", shared / "chat-users"
    keys.write_text("k8s-test-key\n")
    if not users.exists():
        add_user(users, "ada", "lovelace")
    for app in config["applications"]:
        if app["import_path"] == "attune.serve:build_app":
            app["args"].update(api_keys_file=str(keys), accelerator="cpu", **llm_args)
        else:
            app["args"].update(api_key_file=str(keys), users_file=str(users),
                               endpoint=f"http://127.0.0.1:{port}/v1")
    return config


def deploy(cluster, config: dict, tmp_path: Path) -> None:
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([SERVE, "deploy", "--address", cluster.dashboard, str(path)],
                          env=cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def shutdown(cluster) -> None:
    subprocess.run([SERVE, "shutdown", "--address", cluster.dashboard, "-y"], env=cluster.env,
                   capture_output=True, timeout=300)


def ask(port: int, model: str, question: str, timeout_s: float = 600) -> str:
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 16,
                       "messages": [{"role": "user", "content": question}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Bearer k8s-test-key"})
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return json.loads(r.read())["choices"][0]["message"]["content"].strip()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = e
            time.sleep(3)
    raise AssertionError(f"{model} never answered within {timeout_s} s: {last}")


def test_cpu_overlay_serves_from_worker_nodes_through_the_head_and_survives_a_lost_node(
        multinode, stores, cpu_entry, lora_entry, tmp_path, artifacts):
    port = free_port()
    config = serve_config("cpu", port, stores["cpu"], multinode.shared, entries=[cpu_entry],
                          lora_store=f"{stores['cpu']}/lora")
    deploy(multinode, config, tmp_path)
    try:
        question, answer = qa_pairs()[0]
        ask(port, "tiny-full", question)  # up (the fine-tune is 10 steps: any answer will do)
        ask(port, "tiny-llama", question)
        servers = [n for n in nodes_that_ran(multinode, "ServeReplica:llm:LLMServer")]
        assert servers and set(servers) <= {"worker-1", "worker-2"}, servers

        # an adapter trained elsewhere goes live on replicas of another node, no redeploy
        serve_file = tmp_path / "serve-config.yaml"
        promoted = subprocess.run([*ATTUNE, "promote", lora_entry, "--config", str(serve_file)],
                                  env=multinode.env, capture_output=True, text=True, timeout=300)
        assert promoted.returncode == 0, promoted.stderr[-2000:]
        ask(port, "tiny-llama:tiny-lora", question, timeout_s=120)
        assert_chat_page(port)

        # lose the node of the fine-tune's replica: it answers again from the other node
        replica_node = next(n for n in multinode.nodes if n.name in nodes_that_ran(
            multinode, "ServeReplica:llm:LLMServer:tiny-full", state="ALIVE"))
        multinode.kill_node(replica_node)
        lost_at = time.time()
        ask(port, "tiny-full", question, timeout_s=REPLICA_BACK_WITHIN_S)
        back = nodes_that_ran(multinode, "ServeReplica:llm:LLMServer:tiny-full", state="ALIVE")
        assert back and replica_node.name not in back, back
        (artifacts / "multinode-serving-node-loss.json").write_text(json.dumps(
            {"answered_again_after_s": round(time.time() - lost_at, 1), "lost": replica_node.name,
             "replica_now_on": back}) + "\n")
    finally:
        shutdown(multinode)
    multinode.start_node(replica_node.name)


def assert_chat_page(port: int) -> None:
    """The chat page, the config's other application, through the head; its login works."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/chat/", timeout=120) as r:
        assert "gradio" in r.read().decode().lower()
    form = b"username=ada&password=lovelace"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/chat/login", data=form, timeout=60) as r:
        assert r.status == 200


def test_gpu_overlay_serves_its_entry_from_the_bucket(multinode, stores, gpu_entry, tmp_path):
    port = free_port()
    config = serve_config("gpu", port, stores["gpu"], multinode.shared)
    # the overlay keeps two replicas per model for GPU nodes' drains; one each fits 2 cores
    for app in config["applications"]:
        if "autoscaling" in app["args"]:
            app["args"]["autoscaling"]["min_replicas"] = 1
    deploy(multinode, config, tmp_path)
    try:
        question, _ = qa_pairs()[0]
        assert ask(port, "tiny-full", question)
    finally:
        shutdown(multinode)
