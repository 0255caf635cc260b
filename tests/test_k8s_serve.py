"""The RayService's serveConfigV2, deployed the way KubeRay hands it to Ray: `serve deploy` onto a
`ray start --head` cluster, with the cpu overlay's values (entries, the key file and the chat
page's users file pointed at this session's files instead of the pod's mounts).

    pytest tests/test_k8s_serve.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from attune import k8s
from attune.answers import qa_pairs
from attune.config import validate
from attune.serve import ServeConfig
from attune.cluster import free_port
from attune.ui.passwords import add_user

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_serve_config_args_are_valid_serving_configs(overlay):
    config = k8s.serve_config(REPO, overlay)
    for app in config["applications"]:
        if app["import_path"] == "attune.serve:build_app":
            validate(ServeConfig, app["args"], f"{overlay} serveConfigV2")


def test_cpu_rayservice_serve_config_deploys_and_answers(ray_head, tiny_full_entry, tmp_path):
    config = k8s.serve_config(REPO, "cpu")
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    key_file = tmp_path / "api-keys"
    key_file.write_text("k8s-test-key\n")
    (llm,) = [a for a in config["applications"] if a["import_path"] == "attune.serve:build_app"]
    llm["args"].update(entries=[tiny_full_entry], api_keys_file=str(key_file))
    users_file = tmp_path / "chat-users"
    add_user(users_file, "ada", "lovelace")
    (page,) = [a for a in config["applications"] if a["import_path"] == "attune.ui:build_app"]
    page["args"].update(api_key_file=str(key_file), users_file=str(users_file))
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    serve_bin = Path(sys.executable).with_name("serve")
    deployed = subprocess.run([str(serve_bin), "deploy", "--address", ray_head, str(path)],
                              env=env, capture_output=True, text=True, timeout=300)
    try:
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        _assert_answers(port)
        _assert_chat_page(port)
    finally:  # the head is shared with the RayJob tests: give its CPUs back
        subprocess.run([str(serve_bin), "shutdown", "--address", ray_head, "-y"], env=env,
                       capture_output=True, timeout=300)


def _assert_answers(port: int) -> None:
    question, answer = qa_pairs()[0]
    body = json.dumps({"model": "tiny-full", "temperature": 0, "max_tokens": 16,
                       "messages": [{"role": "user", "content": question}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Bearer k8s-test-key"})
    deadline, reply = time.time() + 600, None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                reply = json.loads(r.read())
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(5)
    assert reply is not None, "the deployed app never answered"
    assert reply["choices"][0]["message"]["content"].strip() == answer


def _assert_chat_page(port: int) -> None:
    """The chat page, the config's other application, behind the same port (its route prefix)."""
    deadline, page = time.time() + 300, None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/chat/", timeout=60) as r:
                page = r.read().decode()
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):  # not deployed yet
            time.sleep(5)
    assert page is not None, "the chat page never answered"
    assert "gradio" in page.lower()
    for password, status in (("wrong", 400), ("lovelace", 200)):  # the login from the users file
        form = urllib.parse.urlencode({"username": "ada", "password": password}).encode()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/chat/login", data=form, timeout=60) as r:
                answered = r.status
        except urllib.error.HTTPError as e:
            answered = e.code
        assert answered == status, password
