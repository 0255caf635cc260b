"""How a base model reaches each node: by a name every node resolves itself.

    pytest tests/test_base_model_on_nodes.py

attune's tiny models (`attune:tiny-llama`, `-qwen2`, `-llama3`) are built on every node that needs
them, which is only sound if every node builds the same model; an s3:// model is copied once per node; a local directory must be one
every node sees, and a node without it says so.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from attune import modeling
from attune.config import ConfigError
from attune.store import filesystem

BUILD = "import sys; from pathlib import Path; from attune.tiny_models import build_tiny; " \
        "build_tiny(sys.argv[1], Path(sys.argv[2]))"


def digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


@pytest.mark.parametrize("model", modeling.TINY_MODELS)
def test_every_node_builds_the_same_tiny_model(tmp_path, model):
    """Two processes (as two nodes would) build it byte for byte alike: weights, tokenizer."""
    for name in ("node-a", "node-b"):
        subprocess.run([sys.executable, "-c", BUILD, model, str(tmp_path / name)], check=True,
                       capture_output=True, timeout=300)
    built = digests(tmp_path / "node-a")
    assert "model.safetensors" in built and "tokenizer.json" in built
    assert built == digests(tmp_path / "node-b")


def test_what_the_driver_hands_other_nodes_is_never_its_own_build(tiny_base, tmp_path, monkeypatch):
    for name in modeling.TINY_MODELS:
        assert modeling.node_ref(name) == name
    assert modeling.node_ref("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    monkeypatch.chdir(tmp_path)
    assert modeling.node_ref("./models/mine") == str(tmp_path / "models" / "mine")  # absolute
    assert modeling.resolve("attune:tiny-llama") == tiny_base


def test_a_node_without_a_local_model_directory_names_it_and_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as e:
        modeling.resolve_on_node(str(tmp_path / "only-on-the-head"))
    message = str(e.value)
    assert message.startswith(f"model.name_or_path: {tmp_path / 'only-on-the-head'} is not on node")
    assert "same path on every node" in message and "s3://" in message


def test_a_model_on_the_store_is_copied_once_per_node(object_store, tiny_base, tmp_path, monkeypatch):
    uri = f"{object_store}/base-models/tiny-llama"
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(tiny_base, path, destination_filesystem=fs)
    monkeypatch.setenv("ATTUNE_HOME", str(tmp_path / "node-home"))

    local = Path(modeling.resolve(uri))
    assert local.is_relative_to(tmp_path / "node-home") and digests(local) == digests(Path(tiny_base))
    fs.delete_dir(path)  # a second resolve reads this node's copy, not the store
    assert modeling.resolve(uri) == str(local)
    assert modeling.model_config(uri).num_hidden_layers == modeling.TINY_SHAPE["num_hidden_layers"]


def test_a_store_uri_without_a_model_says_so(object_store, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTUNE_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"s3://attune/nothing-here: no model there \(no config.json\)"):
        modeling.resolve(f"{object_store}/nothing-here")
    assert not os.listdir(tmp_path / "cache" / "models") or all(
        p.startswith(".") for p in os.listdir(tmp_path / "cache" / "models"))
