"""Whether what a run asks for fits the cluster, before Ray waits forever for it.

    check_fits([{"CPU": 1, "GPU": 1}] * 2, what="2 Train workers", key="scaling.gpus_per_worker")

Ray queues a request that no node can meet and waits without a word. Here it fails in seconds,
with what is asked and what the nodes have, unless the cluster's autoscaler could add nodes
that meet it: then it asks for them and waits, saying so, for ATTUNE_SCALE_UP_TIMEOUT_S.
"""

from __future__ import annotations

import os
import time

import ray
from ray.autoscaler.sdk import request_resources

from attune.config import ConfigError
from attune.ray_internals import cluster_state

# How long a run waits for the autoscaler to add nodes it needs before it gives up.
SCALE_UP_TIMEOUT_ENV = "ATTUNE_SCALE_UP_TIMEOUT_S"
# Resources Ray gives every node that no request of attune's asks for.
IGNORED = ("memory", "object_store_memory")


def check_fits(bundles: list[dict[str, float]], what: str, key: str) -> None:
    """Fail, naming `key`, unless every bundle fits on a node (all of them at once)."""
    nodes = _alive_nodes()
    if fits(bundles, nodes):
        return
    addable = _autoscaler_nodes()
    if addable and fits(bundles, nodes + addable):
        wait_for_nodes(bundles, what, key, float(os.environ.get(SCALE_UP_TIMEOUT_ENV, 900)))
        return
    raise ConfigError(f"{key}: {what} need {_show_bundles(bundles)}, which the cluster's nodes "
                      f"({'; '.join(_show(n) for n in nodes) or 'none'}) cannot hold"
                      f"{' even with the nodes its autoscaler can add' if addable else ''}")


def wait_for_nodes(bundles: list[dict[str, float]], what: str, key: str, timeout_s: float, *,
                   alive_nodes=None, request=request_resources, sleep=time.sleep,
                   clock=time.monotonic, every_s: float = 30) -> None:
    """Ask the autoscaler for the bundles and wait, saying so every `every_s`, until the nodes
    hold them; fail after `timeout_s`."""
    alive_nodes = alive_nodes or _alive_nodes
    request(bundles=bundles)  # now, rather than when Ray's queue reports the demand
    start = said = clock()
    print(f"[attune] {what} ({_show_bundles(bundles)}) do not fit the cluster's nodes now; "
          f"asked its autoscaler for nodes, waiting up to {timeout_s:g} s", flush=True)
    try:
        while not fits(bundles, nodes := alive_nodes()):
            if clock() - start >= timeout_s:
                raise ConfigError(
                    f"{key}: {what} need {_show_bundles(bundles)}; after {timeout_s:g} s the "
                    f"cluster's nodes are {'; '.join(_show(n) for n in nodes) or 'none'} "
                    f"({SCALE_UP_TIMEOUT_ENV} sets how long to wait for the autoscaler)")
            if clock() - said >= every_s:
                said = clock()
                print(f"[attune] waiting for the autoscaler ({said - start:.0f} s): nodes now "
                      f"{'; '.join(_show(n) for n in nodes) or 'none'}", flush=True)
            sleep(5)
    finally:
        request(bundles=[])  # the run's own placement holds what it needs from here on
    print("[attune] the autoscaler added the nodes", flush=True)


# GiB of memory of the GPUs Ray names by `accelerator_type:<type>` (ray.util.accelerators).
# Ray names the 40 GB and the 80 GB A100 alike "A100" where it cannot tell them apart: 80 here,
# so A100-40GB users set scaling.device_memory_gib=40.
ACCELERATOR_GIB = {"H100": 80, "H200": 141, "H20": 96, "B200": 180, "A100": 80, "A100-80G": 80,
                   "A100-40G": 40, "L4": 24, "A10G": 24, "L40S": 48, "V100": 16, "T4": 16,
                   "RTX-PRO-6000": 96}


def device_memory(recipe, nodes: list[dict[str, float]] | None = None) -> tuple[float | None, str]:
    """GiB of one Train worker's device, and where that figure came from: the recipe's field;
    the GPUs' accelerator type (the smallest, where nodes differ); for CPU workers, a node's
    memory shared by the workers that land on it (the roomiest node: CPU runs are refused only
    when even that cannot hold them). None where the cluster does not say."""
    sc = recipe.scaling
    if sc.device_memory_gib is not None:
        return sc.device_memory_gib, "scaling.device_memory_gib"
    nodes = _alive_nodes() if nodes is None else nodes
    if sc.gpus_per_worker:
        types = {r.split(":", 1)[1] for n in nodes if n.get("GPU") for r in n
                 if r.startswith("accelerator_type:")}
        known = {t: ACCELERATOR_GIB[t] for t in types if t in ACCELERATOR_GIB}
        if not types or len(known) < len(types):
            unknown = ", ".join(sorted(types - set(known))) or "none reported"
            return None, (f"the GPUs' memory is unknown (accelerator type: {unknown}); set "
                          "scaling.device_memory_gib=<GiB of one GPU> to check the plan")
        smallest = min(known, key=known.get)
        note = " (an A100-40GB: set scaling.device_memory_gib=40)" if smallest == "A100" else ""
        return known[smallest], f"accelerator_type:{smallest}{note}"
    shares = [n["memory"] / 2**30 / min(sc.num_workers, max(1, int(n.get("CPU", 0) // sc.cpus_per_worker)))
              for n in nodes if n.get("memory") and n.get("CPU", 0) >= sc.cpus_per_worker]
    if not shares:
        return None, "no node reports its memory; set scaling.device_memory_gib to check the plan"
    return max(shares), "a node's memory shared by the workers on it"


def working_nodes() -> int:
    """How many alive nodes can run work (a head started with no CPUs or GPUs cannot)."""
    return sum(1 for n in _alive_nodes() if n.get("CPU", 0) or n.get("GPU", 0))


def _alive_nodes() -> list[dict[str, float]]:
    return [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]


def fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """First fit, largest bundles first: a placement of every bundle on some node."""
    free = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: sorted(b.items(), reverse=True), reverse=True):
        node = next((n for n in free if all(n.get(r, 0) >= a for r, a in bundle.items())), None)
        if node is None:
            return False
        for resource, amount in bundle.items():
            node[resource] = node.get(resource, 0) - amount
    return True


def _autoscaler_nodes() -> list[dict[str, float]]:
    """The nodes the autoscaler may add (KubeRay's worker groups), up to a few of each type."""
    config = cluster_state.get_cluster_config()
    if config is None:
        return []
    nodes = []
    for group in config.node_group_configs:
        count = group.max_count if group.max_count >= 0 else 64
        nodes += [dict(group.resources)] * min(count, 64)
    return nodes


def _show(resources: dict[str, float]) -> str:
    shown = {r: a for r, a in resources.items() if r in ("CPU", "GPU") or
             (not r.startswith("node:") and r not in IGNORED and "accelerator_type" not in r)}
    return ", ".join(f"{a:g} {r}" for r, a in sorted(shown.items())) or "nothing"


def _show_bundles(bundles: list[dict[str, float]]) -> str:
    kinds: dict[str, int] = {}
    for bundle in bundles:
        kinds[_show(bundle)] = kinds.get(_show(bundle), 0) + 1
    return " + ".join(f"{count} x ({shown})" for shown, count in kinds.items())
