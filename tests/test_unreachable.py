"""What is not there fails in seconds, in one line that names it, and creates nothing: a Ray
cluster, an endpoint or a tracking server that does not answer, a path that is not a registry
entry, a feedback database that does not exist. Each command runs as a user runs it; its
timeout, generous next to the seconds it needs, stands for the minutes of retries it replaces."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from running import ATTUNE, REPO

from attune import tracking
from attune.cli import main
from attune.cluster import check_cluster_answers, free_port
from attune.config import ConfigError
from attune.evaluate.lm_eval_harness import check_endpoint
from attune.feedback import FeedbackStore
from attune.recipe import Recipe

# Far more than the few seconds each takes (a loaded machine's imports included), far less than
# the retries each used to wait through.
ENDS_WITHIN_S = 120


def fails_in_one_line(*argv: str, **env: str) -> str:
    """The command's one line on stderr; it must end with exit 2 and no traceback."""
    done = subprocess.run([*ATTUNE, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=ENDS_WITHIN_S, env={**os.environ, **env})
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attune: "), done.stderr[-3000:]
    return lines[0]


def test_a_ray_address_where_no_cluster_runs(tiny_base, tmp_path):
    port = free_port()
    line = fails_in_one_line("train", "recipes/tiny-full.yaml",
                             f"output.registry={tmp_path}/registry", f"output.runs={tmp_path}/runs",
                             f"tracking.uri=sqlite:///{tmp_path}/m.db",
                             RAY_ADDRESS=f"127.0.0.1:{port}")
    assert line.startswith(f"attune: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers at "
                           f"127.0.0.1:{port} (Connection refused); start one"), line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("address, said", [
    ("ray://127.0.0.1:{port}", "no Ray Client server answers at 127.0.0.1:{port} "),
    ("127.0.0.1:{port}", "no Ray cluster answers at 127.0.0.1:{port} "),
    ("http://127.0.0.1:{port}", "a dashboard's address, as `attune submit --address` takes; "),
])
def test_each_form_of_ray_address_is_checked(address, said):
    port = free_port()
    address, said = address.format(port=port), said.format(port=port)
    with pytest.raises(ConfigError) as refused:
        check_cluster_answers(address)
    assert str(refused.value).startswith(f"RAY_ADDRESS={address}: {said}"), refused.value


def test_an_eval_endpoint_where_nothing_listens(tmp_path):
    entry = tmp_path / "tiny-full"
    entry.mkdir()
    manifest = json.dumps({"name": "tiny-full", "recipe": {}})
    (entry / "attune.json").write_text(manifest)
    url = f"http://127.0.0.1:{free_port()}/v1"
    line = fails_in_one_line("eval", str(entry), "--endpoint", url)
    assert line == (f"attune: --endpoint {url}: nothing answers there ([Errno 111] Connection "
                    "refused)")
    assert (entry / "attune.json").read_text() == manifest  # no scores recorded


class _Models(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "tiny-llama"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_attune_models_lists_an_endpoints_models_or_says_in_one_line_that_none_answers():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        listed = subprocess.run([*ATTUNE, "models", "--endpoint",
                                 f"http://127.0.0.1:{server.server_port}/v1"], cwd=REPO,
                                capture_output=True, text=True, timeout=ENDS_WITHIN_S)
    finally:
        server.shutdown()
    assert listed.returncode == 0 and listed.stdout.split() == ["tiny-llama"], listed.stderr[-3000:]
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert fails_in_one_line("models", "--endpoint", url).startswith(
        f"attune: Cannot reach the endpoint at {url}.")


def test_an_eval_endpoint_that_does_not_serve_the_model():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        check_endpoint(url, "key", "tiny-llama")  # served: no error
        with pytest.raises(ConfigError, match=rf"^--model tiny-lora: not served at {url} "
                                              r"\(it serves tiny-llama\)$"):
            check_endpoint(url, "key", "tiny-lora")
    finally:
        server.shutdown()


def test_runs_with_a_tracking_server_that_is_down(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    line = fails_in_one_line("runs", MLFLOW_TRACKING_URI=uri, ATTUNE_HOME=str(tmp_path / "home"))
    assert line == (f"attune: MLflow tracking URI {uri}: no tracking server answers at "
                    f"{uri.removeprefix('http://')} (Connection refused)")


def test_training_with_a_tracking_server_that_is_down_warns_once_and_goes_on(capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    recipe = Recipe(name="r", optim={"max_steps": 50}, tracking={"uri": uri})
    with tracking.train_run(recipe) as run:
        assert run.callbacks == [] and run.manifest_fields == {}
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == [f"[attune] warning: MLflow tracking URI {uri}: no tracking server answers "
                        f"at {uri.removeprefix('http://')} (Connection refused); this run goes on "
                        "untracked"]


@pytest.mark.parametrize("argv", [
    ["eval", "{path}"],
    ["eval", "{path}", "--endpoint", "http://127.0.0.1:9/v1"],
    ["promote", "{path}"],
    ["promote", "{path}", "--require", "exact_match>=0.5"],
])
def test_a_path_that_is_not_an_entry(argv, tmp_path, capsys):
    path = tmp_path / "no-such-entry"
    assert main([a.format(path=path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err == f"attune: {path}: not a registry entry (nothing there)\n", err
    assert not path.exists()


def test_answers_of_a_directory_without_a_model(tmp_path, capsys):
    assert main(["answers", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"attune: {tmp_path}: not a registry entry nor a model "
                                       "directory (no config.json or adapter_config.json in it)\n")


def test_serving_an_entry_that_is_not_there_fails_before_ray(tmp_path, capsys, monkeypatch):
    from attune.serve import local

    monkeypatch.setattr(local, "ensure_ray", lambda: pytest.fail("Ray started"))
    config = tmp_path / "serve.yaml"
    entry = tmp_path / "no-such-entry"
    config.write_text(f"base_models: [{{id: tiny-llama, name_or_path: 'attune:tiny-llama'}}]\n"
                      f"entries: ['{entry}']\n")
    assert main(["serve", str(config)]) == 2
    assert capsys.readouterr().err == f"attune: {entry}: not a registry entry (nothing there)\n"


def test_exporting_feedback_from_a_database_that_does_not_exist(tmp_path):
    out = tmp_path / "dpo.jsonl"
    db = tmp_path / "typo" / "path.db"
    line = fails_in_one_line("feedback", "export", "--as", "dpo", str(out), "--db", f"sqlite:///{db}")
    assert line == (f"attune: feedback database sqlite:///{db}: does not exist (nothing at {db}); "
                    "the chat page creates it with its first feedback")
    assert not list(tmp_path.iterdir())  # no directory, no database, no export


def test_exporting_feedback_from_a_database_that_is_not_the_pages(tmp_path):
    db = tmp_path / "other.db"
    sqlite3.connect(db).execute("create table other (id integer)").connection.close()
    with pytest.raises(ConfigError, match=r"has no feedback table \(not the chat page's database\)"):
        FeedbackStore(f"sqlite:///{db}", create=False)
