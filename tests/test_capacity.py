"""Asking for what the cluster does not have fails in seconds with both figures, instead of
waiting forever (attune.capacity)."""

from __future__ import annotations

import pytest

from attune.capacity import fits, wait_for_nodes
from attune.config import ConfigError
from attune.recipe import load_recipe
from attune.serve import ServeConfig
from attune.serve.local import run
from attune.train.trainer import fine_tune


def test_bundles_are_placed_on_nodes_whole():
    node = {"CPU": 4}
    assert fits([{"CPU": 2}] * 2, [node])
    assert not fits([{"CPU": 2}] * 3, [node])
    assert fits([{"CPU": 3}, {"CPU": 1}, {"CPU": 2}, {"CPU": 2}], [node, node])
    assert not fits([{"CPU": 3}] * 2, [{"CPU": 2}, {"CPU": 2}, {"CPU": 2}])  # 6 CPUs, no node of 3
    assert not fits([{"CPU": 1, "GPU": 1}], [{"CPU": 16}])


@pytest.mark.slow
def test_training_on_gpus_the_cluster_lacks_fails_at_once(ray_cluster):
    recipe = load_recipe("recipes/tiny-full.yaml", ["scaling.gpus_per_worker=1"])
    with pytest.raises(ConfigError, match=r"^scaling.gpus_per_worker: 2 Train workers need "
                                          r"2 x \(1 CPU, 1 GPU\), which the cluster's nodes "
                                          r"\(16 CPU\) cannot hold$"):
        fine_tune(recipe)


@pytest.mark.slow
def test_serving_on_gpus_the_cluster_lacks_fails_at_once(ray_cluster):
    config = ServeConfig(base_models=[{"id": "tiny-llama", "name_or_path": "attune:tiny-llama"}],
                         accelerator="gpu")
    with pytest.raises(ConfigError, match=r"^accelerator: 1 model\(s\) x 1 replica\(s\) need "
                                          r"1 x \(1 GPU\), which the cluster's nodes"):
        run(config, name="no-gpus")


class Clock:
    """Time that passes only when the code under test sleeps."""

    def __init__(self):
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_waiting_for_the_autoscaler_ends_when_its_nodes_arrive(capsys):
    clock, asked = Clock(), []
    nodes = iter([[{"CPU": 4}]] * 10 + [[{"CPU": 4}, {"CPU": 4, "GPU": 1}]])
    wait_for_nodes([{"CPU": 1, "GPU": 1}], "1 Train worker", "scaling.gpus_per_worker", 600,
                   alive_nodes=lambda: next(nodes), request=lambda bundles: asked.append(bundles),
                   sleep=clock.sleep, clock=lambda: clock.now)
    assert asked == [[{"CPU": 1, "GPU": 1}], []]  # asked for, then the standing request cleared
    out = capsys.readouterr().out
    assert "asked its autoscaler for nodes, waiting up to 600 s" in out
    assert "[attune] waiting for the autoscaler (30 s): nodes now 4 CPU" in out
    assert out.endswith("[attune] the autoscaler added the nodes\n")


def test_waiting_for_the_autoscaler_gives_up_with_both_figures():
    clock = Clock()
    with pytest.raises(ConfigError, match=r"^scaling.gpus_per_worker: 1 Train worker need "
                                          r"1 x \(1 CPU, 1 GPU\); after 60 s the cluster's nodes "
                                          r"are 4 CPU \(ATTUNE_SCALE_UP_TIMEOUT_S sets"):
        wait_for_nodes([{"CPU": 1, "GPU": 1}], "1 Train worker", "scaling.gpus_per_worker", 60,
                       alive_nodes=lambda: [{"CPU": 4}], request=lambda bundles: None,
                       sleep=clock.sleep, clock=lambda: clock.now)
