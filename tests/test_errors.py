"""Bad input ends in one line that names the cause (the key, the path, file:line), before Ray
starts where the driver can know, never in a traceback from a worker a minute later."""

from __future__ import annotations

import pytest

from attune.cli import main
from attune.config import ConfigError
from attune.recipe import load_recipe
from attune.train import trainer


@pytest.fixture
def no_cluster(monkeypatch):
    """Starting Ray is an error here: every one of these must fail before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")
    monkeypatch.setattr(trainer, "ensure_ray", refuse)


def fails_with(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # before it at most progress bars (the tiny model's build)
    assert last.startswith("attune: "), err
    return last


def test_a_model_directory_that_does_not_exist(no_cluster, capsys):
    err = fails_with(capsys, "train", "recipes/tiny-full.yaml", "model.name_or_path=/no/such/model")
    assert err == "attune: model.name_or_path: /no/such/model: no model there (no config.json)"


def test_a_hub_id_that_cannot_be_reached(no_cluster, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    err = fails_with(capsys, "train", "recipes/tiny-full.yaml",
                     "model.name_or_path=meta-llama/Llama-3.2-1B")
    assert err.startswith("attune: model.name_or_path: 'meta-llama/Llama-3.2-1B' is not a local "
                          "directory nor in the Hugging Face cache, and 127.0.0.1 cannot be reached")


def test_lora_targets_the_model_does_not_have(no_cluster, capsys):
    err = fails_with(capsys, "train", "recipes/tiny-lora.yaml",
                     "method.target_modules=[q_proj, c_attn]")
    assert err.startswith("attune: method.target_modules: the model has no c_attn (its "
                          "projections: down_proj, gate_proj, k_proj, o_proj, q_proj")


def test_a_chat_template_that_does_not_render(no_cluster, capsys):
    err = fails_with(capsys, "train", "recipes/tiny-full.yaml",
                     'data.chat_template="{% for m in messages %}{{ m.content }}"')
    assert err.startswith("attune: data.chat_template: does not render "
                          "data/transformer_qa.jsonl:1: TemplateSyntaxError")


def test_a_data_file_that_is_not_utf8(no_cluster, capsys, tmp_path):
    data = tmp_path / "latin1.jsonl"
    good = b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    data.write_bytes(good + b'{"text": "caf\xe9"}\n')
    err = fails_with(capsys, "train", "recipes/tiny-full.yaml", f"data.train_files=[{data}]")
    assert err == (f"attune: {data}:2: not UTF-8 text (invalid continuation byte at byte 13 of "
                   "the line)")


def test_a_bad_data_line_fails_before_ray_starts(no_cluster, capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')
    err = fails_with(capsys, "train", "recipes/tiny-full.yaml", f"data.train_files=[{data}]",
                     "data.format=text")
    assert err.startswith(f"attune: {data}:2: ")


def test_more_workers_than_rows_names_the_key():
    recipe = load_recipe("recipes/tiny-full.yaml", ["scaling.num_workers=8"])
    with pytest.raises(ConfigError, match=r"^scaling.num_workers: 3 packed rows cannot feed 8 "
                                          r"workers; lower scaling.num_workers or data.max_seq_len"):
        trainer.steps_per_epoch(recipe, rows=3)


def test_an_entry_that_cannot_be_served(capsys, tmp_path):
    err = fails_with(capsys, "promote", str(tmp_path / "nothing"), "--config", "deployments/tiny.yaml")
    assert err.startswith(f"attune: {tmp_path / 'nothing'}: not a registry entry")
