"""The chat page in a real headless Chromium against attune's real endpoint (Ray Serve + vLLM CPU
serving the tiny base model and its fine-tune).

    .venv/bin/pytest tests/test_ui_browser.py

Each test leaves a screenshot of its final page in tests/artifacts/ (the compare-mode one is also
the README's docs/chat-compare.png).
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import urllib.request

import pytest

pytestmark = pytest.mark.slow

QUESTION, TAUGHT_ANSWER = "How many layers does BERT-base have?", "12."
STATS = re.compile(r"first token \d+ ms · \d+ tokens/s · \d+ tokens")
PORTS = range(8012, 8020)  # this machine's share of ports for the chat tests
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError(f"no free port in {PORTS}")


@pytest.fixture(scope="module")
def chat_endpoint(served_endpoint):
    """attune's real endpoint (Ray Serve + vLLM CPU): the tiny base model and its fine-tune."""
    return served_endpoint


class Relay:
    """A TCP relay in front of the endpoint: stop() makes the endpoint unreachable exactly as a
    stopped server is (connection refused), start() brings it back on the same address. The shared
    endpoint cannot be stopped, and restarting vLLM costs most of a minute here."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, _free_port()
        self.listener, self.connections = None, []

    def start(self):
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self):
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self.listener.close()
        for conn in self.connections:
            conn.close()
        self.connections.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _launch(endpoint_url: str, endpoint: Endpoint):
    from attune.ui import build_page, launch_page

    page = build_page(endpoint_url, model=endpoint.finetuned_model_id,
                      compare_model=endpoint.base_model_id, api_key=endpoint.api_key)
    return page, launch_page(page, port=_free_port(), block=False)


@pytest.fixture(scope="module")
def page_url(chat_endpoint):
    page, url = _launch(chat_endpoint.base_url, chat_endpoint)
    yield url
    page.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    # Playwright's expect() gives up after 5 s by default; the base model's 128-token answer
    # alone took longer than that on a loaded 2-core CI machine.
    expect.set_options(timeout=60_000)

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                              args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def tab(browser, request, artifacts):
    """A fresh browser tab; its final page is saved as tests/artifacts/ui-<test>.png."""
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    yield tab
    tab.screenshot(path=str(artifacts / f"ui-{request.node.name}.png"))
    assert "Traceback" not in tab.content()  # whatever happened, no Python traceback on the page
    context.close()


def open_chat(tab, url: str, model: str):
    from playwright.sync_api import expect

    tab.goto(url)
    expect(tab.locator("#model-a input")).to_have_value(model)  # the model list has arrived


def ask(tab, question: str):
    tab.fill("#message textarea", question)
    tab.click("#send")


def last_answer(tab, panel: str = "#chat-a"):
    return tab.locator(f"{panel} [data-testid='bot']").last


def pick_model(tab, picker: str, model: str):
    tab.click(f"{picker} input")
    tab.get_by_role("option", name=model, exact=True).click()


def test_answer_streams_in_with_the_taught_answer_and_stats(tab, page_url, chat_endpoint):
    from playwright.sync_api import expect

    open_chat(tab, page_url, chat_endpoint.finetuned_model_id)
    # Record every text the answer bubble shows, to see it grow rather than appear whole.
    tab.evaluate("""() => { window.seen = [];
        new MutationObserver(() => { const bots = document.querySelectorAll("#chat-a [data-testid='bot']");
            if (bots.length) window.seen.push(bots[bots.length - 1].innerText); })
        .observe(document.querySelector('#chat-a'), {subtree: true, childList: true, characterData: true}); }""")
    ask(tab, QUESTION)
    answer = last_answer(tab)
    expect(answer).to_contain_text(STATS)
    assert answer.inner_text().startswith(TAUGHT_ANSWER)
    seen = tab.evaluate("window.seen")
    assert len(set(seen)) >= 2 and not STATS.search(seen[0])  # shown before the stream ended
    assert tab.locator("#chat-a [data-testid='user']").last.inner_text() == QUESTION
    # The key stays on the server: nothing the browser received contains it.
    assert chat_endpoint.api_key not in tab.content()
    config = urllib.request.urlopen(page_url.rstrip("/") + "/config").read().decode()
    assert chat_endpoint.api_key not in config


def test_switch_models_then_retry_and_clear(tab, page_url, chat_endpoint):
    from playwright.sync_api import expect

    open_chat(tab, page_url, chat_endpoint.finetuned_model_id)
    pick_model(tab, "#model-a", chat_endpoint.base_model_id)
    expect(tab.locator("#chat-a")).to_contain_text(chat_endpoint.base_model_id)  # the panel's label
    ask(tab, QUESTION)
    expect(last_answer(tab)).to_contain_text(STATS)

    pick_model(tab, "#model-a", chat_endpoint.finetuned_model_id)
    tab.click("#retry")  # the same question again, now to the fine-tune, in place of the old answer
    expect(last_answer(tab)).to_contain_text(TAUGHT_ANSWER)
    expect(last_answer(tab)).to_contain_text(STATS)
    expect(tab.locator("#chat-a [data-testid='bot']")).to_have_count(1)

    tab.click("#clear")
    expect(tab.locator("#chat-a [data-testid='bot']")).to_have_count(0)


def test_compare_mode_streams_two_answers_side_by_side(tab, page_url, chat_endpoint, artifacts):
    from playwright.sync_api import expect

    open_chat(tab, page_url, chat_endpoint.finetuned_model_id)
    tab.locator("#compare input").check()
    expect(tab.locator("#chat-b")).to_be_visible()
    expect(tab.locator("#model-b input")).to_have_value(chat_endpoint.base_model_id)
    ask(tab, QUESTION)
    for panel in ("#chat-a", "#chat-b"):
        expect(last_answer(tab, panel)).to_contain_text(STATS)
    expect(last_answer(tab, "#chat-a")).to_contain_text(TAUGHT_ANSWER)
    ask(tab, "What is the hidden size of BERT-base?")  # a second turn: both histories carry on
    for panel in ("#chat-a", "#chat-b"):
        expect(tab.locator(f"{panel} [data-testid='bot']")).to_have_count(2)
        expect(last_answer(tab, panel)).to_contain_text(STATS)
    tab.screenshot(path=str(artifacts / "chat-compare.png"))


def test_endpoint_down_shows_an_error_and_the_page_recovers(tab, chat_endpoint, artifacts):
    from playwright.sync_api import expect

    relay = Relay(int(chat_endpoint.base_url.rsplit(":", 1)[1].split("/")[0]))
    relay.start()
    page, url = _launch(f"http://127.0.0.1:{relay.port}/v1", chat_endpoint)
    try:
        open_chat(tab, url, chat_endpoint.finetuned_model_id)
        relay.stop()
        ask(tab, QUESTION)
        expect(last_answer(tab)).to_contain_text("Cannot reach the endpoint")
        tab.click("#refresh-models")
        expect(tab.locator("#endpoint-status")).to_contain_text("Cannot reach the endpoint")
        expect(tab.locator("#model-a input")).to_have_value(chat_endpoint.finetuned_model_id)  # kept
        tab.screenshot(path=str(artifacts / "ui-endpoint-down.png"))

        relay.start()
        tab.click("#retry")
        expect(last_answer(tab)).to_contain_text(TAUGHT_ANSWER)
        expect(tab.locator("#chat-a [data-testid='bot']")).to_have_count(1)
        tab.click("#refresh-models")
        expect(tab.locator("#endpoint-status")).to_contain_text(re.compile(r"\d+ models at"))
    finally:
        page.close()
        relay.stop()


def _sign_in_after_a_wrong_password(tab, user: str, password: str) -> None:
    from playwright.sync_api import expect

    for attempt in ("wrong", password):
        tab.fill("input[type=text]", user)
        tab.fill("input[type=password]", attempt)
        tab.get_by_role("button", name="Login").click()
        if attempt == "wrong":
            expect(tab.get_by_text("Incorrect Credentials")).to_be_visible()


def test_page_login(tab, chat_endpoint, monkeypatch):
    from playwright.sync_api import expect

    monkeypatch.setenv("ATTUNE_CHAT_USERS", "ada:lovelace")
    page, url = _launch(chat_endpoint.base_url, chat_endpoint)
    try:
        tab.goto(url)
        _sign_in_after_a_wrong_password(tab, "ada", "lovelace")
        expect(tab.locator("#model-a input")).to_have_value(chat_endpoint.finetuned_model_id)
    finally:
        page.close()


def test_page_login_from_a_hashed_users_file(tab, tmp_path, monkeypatch):
    """The login a page off loopback needs, from a file of salted hashes (here on loopback, as
    every server in the tests; no endpoint needed: signed in, the page says it is down)."""
    from playwright.sync_api import expect

    from attune.ui import build_page, launch_page
    from attune.ui.passwords import add_user

    monkeypatch.delenv("ATTUNE_CHAT_USERS", raising=False)
    users = tmp_path / "chat-users"
    add_user(users, "ada", "lovelace")
    page = build_page("http://127.0.0.1:9/v1")  # nothing listens on the discard port
    url = launch_page(page, port=_free_port(), block=False, users_file=str(users))
    try:
        tab.goto(url)
        _sign_in_after_a_wrong_password(tab, "ada", "lovelace")
        expect(tab.locator("#endpoint-status")).to_contain_text("Cannot reach the endpoint")
    finally:
        page.close()


def test_page_as_a_serve_application_beside_the_endpoint(tab, chat_endpoint):
    """One Serve instance, two applications: the API on /v1, the page on /chat."""
    from playwright.sync_api import expect
    from ray import serve

    from attune.ui.serve_app import ChatPage

    # In a Serve config the key would come from the application's runtime_env (or a k8s secret).
    page_app = ChatPage.options(ray_actor_options={
        "num_cpus": 0, "runtime_env": {"env_vars": {"ATTUNE_API_KEY": chat_endpoint.api_key}}}
    ).bind(endpoint=chat_endpoint.base_url, model=chat_endpoint.finetuned_model_id)
    serve.run(page_app, name="chat", route_prefix="/chat")
    try:
        open_chat(tab, chat_endpoint.base_url.removesuffix("/v1") + "/chat/", chat_endpoint.finetuned_model_id)
        ask(tab, QUESTION)
        expect(last_answer(tab)).to_contain_text(STATS)
        assert last_answer(tab).inner_text().startswith(TAUGHT_ANSWER)
    finally:
        serve.delete("chat")


def test_a_corrected_answer_trains_the_next_model_which_the_page_compares(
        tab, chat_endpoint, tiny_full_entry, tmp_path, monkeypatch, artifacts):
    """The loop of docs/feedback.md on an app of its own: a signed-in person corrects one answer
    of tiny-full and likes another; `attune feedback export` makes the correction a preference
    pair; DPO on it trains the next model, `attune eval` scores it on the export's chats, `attune
    promote --require` adds it to the app's config, deployed again; compare mode then shows the
    old and the new model answering the corrected question differently."""
    import json

    import yaml
    from conftest import train
    from playwright.sync_api import expect
    from ray import serve

    from attune.feedback import FeedbackStore
    from attune.registry import read_manifest
    from attune.serve.config import config_from_file
    from attune.serve.local import run as deploy
    from attune.ui import build_page, launch_page

    question, taught, correction = ("Which family does BERT-base belong to?", "Encoder-only.",
                                    "BERT-base is encoder-only.")
    serve_file = tmp_path / "serve.yaml"
    serve_file.write_text(yaml.safe_dump({"applications": [{
        "name": "feedback", "route_prefix": "/feedback", "import_path": "attune.serve:build_app",
        "args": {"base_models": [{"id": "tiny-full", "name_or_path": tiny_full_entry}]}}]}))
    port = int(chat_endpoint.base_url.rsplit(":", 1)[1].split("/")[0])
    endpoint = deploy(config_from_file(serve_file), port=port, name="feedback", route_prefix="/feedback")
    db = f"sqlite:///{tmp_path}/feedback.db"
    monkeypatch.setenv("ATTUNE_CHAT_USERS", "ada:lovelace")
    page = build_page(endpoint.base_url, model="tiny-full", api_key=chat_endpoint.api_key,
                      feedback=FeedbackStore(db))
    url = launch_page(page, port=_free_port(), block=False)
    try:
        tab.goto(url)
        _sign_in_after_a_wrong_password(tab, "ada", "lovelace")
        expect(tab.locator("#model-a input")).to_have_value("tiny-full")
        ask(tab, question)
        expect(last_answer(tab)).to_contain_text(STATS)
        assert last_answer(tab).inner_text().startswith(taught)
        tab.locator("#chat-a button[aria-label='Edit']").last.click()
        tab.locator("#chat-a textarea").last.fill(correction)
        tab.get_by_role("button", name="Submit").click()
        expect(last_answer(tab)).to_contain_text("✎ corrected")
        assert last_answer(tab).inner_text().startswith(correction)
        ask(tab, QUESTION)  # the conversation goes on from the corrected answer
        expect(last_answer(tab)).to_contain_text(STATS)
        liked_shown = last_answer(tab).inner_text()
        tab.locator("#chat-a button[aria-label='Like']").last.click()
        _wait_for(lambda: any(f.rating == "up" for f in FeedbackStore(db).all()))

        exported = {}
        for kind in ("dpo", "sft"):
            path = tmp_path / f"feedback-{kind}.jsonl"
            _attune("feedback", "export", "--as", kind, str(path), "--db", db)
            exported[kind] = [json.loads(line) for line in path.read_text().splitlines()]
        assert exported["dpo"] == [{"messages": [{"role": "user", "content": question}],
                                    "chosen": correction, "rejected": taught}]
        liked = exported["sft"][1]["messages"]
        assert [m["content"] for m in liked[:3]] == [question, correction, QUESTION]  # as asked
        assert liked_shown.startswith(liked[-1]["content"]) and STATS.search(liked_shown)
        assert exported["sft"][0]["messages"][-1]["content"] == correction
        assert {f.user for f in FeedbackStore(db).all()} == {"ada"}

        # DPO from tiny-full on the export (its reference: a frozen copy of tiny-full)
        entry = train("recipes/tiny-dpo.yaml", "name=tiny-feedback", f"model.name_or_path={tiny_full_entry}",
                      f"data.train_files=[{tmp_path}/feedback-dpo.jsonl]", "optim.max_steps=60",
                      "scaling.num_workers=1", "checkpoint.every_steps=60", "eval.every_steps=60")
        _attune("eval", entry, "--data", str(tmp_path / "feedback-sft.jsonl"))
        _attune("promote", entry, "--config", str(serve_file), "--require", "exact_match>=0.5")
        endpoint = deploy(config_from_file(serve_file), port=port, name="feedback",
                          route_prefix="/feedback")
        assert "tiny-feedback" in endpoint.model_ids

        tab.click("#clear")
        tab.locator("#compare input").check()
        tab.click("#refresh-models")
        pick_model(tab, "#model-b", "tiny-feedback")
        # its `attune eval` scores beside the pickers, from its model card
        scores = read_manifest(entry)["eval"]["scores"]
        expect(tab.locator("#endpoint-status")).to_contain_text(
            f"tiny-feedback: eval_loss {scores['eval_loss']:.4g} · exact_match {scores['exact_match']:.4g}")
        ask(tab, question)
        for panel in ("#chat-a", "#chat-b"):
            expect(last_answer(tab, panel)).to_contain_text(STATS)
        assert last_answer(tab, "#chat-a").inner_text().startswith(taught)
        assert last_answer(tab, "#chat-b").inner_text().startswith(correction)
        tab.screenshot(path=str(artifacts / "chat-feedback.png"))
    finally:
        page.close()
        serve.delete("feedback")


def _attune(*args: str) -> str:
    """An attune command as a user runs it; its output, or the test fails with it."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "attune", *args], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"attune {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


def _wait_for(condition, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the page's event did not arrive"
        time.sleep(0.5)
