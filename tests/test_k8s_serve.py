"""Each overlay's serveConfigV2 holds serving configs attune accepts. Deploying them, on a
cluster of separate nodes with each overlay's store, is tests/test_multinode.py's.

    pytest tests/test_k8s_serve.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from attune import k8s
from attune.config import validate
from attune.serve import ServeConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_serve_config_args_are_valid_serving_configs(overlay):
    config = k8s.serve_config(REPO, overlay)
    for app in config["applications"]:
        if app["import_path"] == "attune.serve:build_app":
            validate(ServeConfig, app["args"], f"{overlay} serveConfigV2")
