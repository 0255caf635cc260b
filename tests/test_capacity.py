"""Asking for what the cluster does not have fails in seconds with both figures, instead of
waiting forever (attune.capacity)."""

from __future__ import annotations

import pytest

from attune.capacity import fits
from attune.config import ConfigError
from attune.recipe import load_recipe
from attune.serve import ServeConfig
from attune.serve.local import run
from attune.trainer import fine_tune


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
