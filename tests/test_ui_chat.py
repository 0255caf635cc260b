"""Unit tests of the chat function against a fake OpenAI-compatible endpoint (real openai client,
real HTTP, canned streamed answers), plus the page's small helpers."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from attune.ui.chat import GenerationSettings, Stats, Turn, messages_for, stream_reply
from attune.ui.compare import side_by_side
from attune.ui.endpoint import describe_scores, list_models, make_client
from attune.ui.passwords import add_user, read_users_file, verify_password
from attune.ui.users import UsersError, page_login


class FakeEndpoint:
    """Streams `pieces` as chat.completion.chunk events and records every request body."""

    def __init__(self, pieces=("Twelve", " layers", "."), models=("base", "tuned"), usage=True,
                 status=200):
        self.pieces, self.models, self.usage, self.status = pieces, models, usage, status
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # /v1/models
                self._json(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in fake.models]})

            def do_POST(self):  # /v1/chat/completions
                fake.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                fake.auth = self.headers.get("Authorization")
                if fake.status != 200:
                    return self._json(fake.status, {"error": {"message": "model 'x' does not exist"}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in fake.pieces:
                    self._event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if fake.usage:
                    self._event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                                                          "total_tokens": 12}})
                self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, body):
                body = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m", **body}
                self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
                self.wfile.flush()

            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    endpoint = FakeEndpoint()
    yield endpoint
    endpoint.close()


def test_messages_put_system_prompt_first_and_skip_failed_turns():
    turns = [Turn("q1", "a1"), Turn("q2", error="endpoint down"), Turn("q3", "a3")]
    messages = messages_for(turns, "q4", GenerationSettings(system_prompt="Be brief."))
    assert messages == [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"},
                        {"role": "user", "content": "q4"}]
    assert messages_for([], "hi", GenerationSettings(system_prompt="  "))[0]["role"] == "user"


def test_stream_assembles_tokens_and_passes_parameters(fake, monkeypatch):
    monkeypatch.setenv("ATTUNE_API_KEY", "server-side-key")
    settings = GenerationSettings(system_prompt="sys", temperature=0.7, top_p=0.9, max_tokens=33,
                                  stop=("\n\n", "END"))
    messages = messages_for([Turn("q1", "a1")], "q2", settings)
    replies = [(r.text, r.done) for r in stream_reply(make_client(fake.base_url), "tuned", messages, settings)]

    assert [text for text, _ in replies] == ["Twelve", "Twelve layers", "Twelve layers.", "Twelve layers."]
    assert replies[-1][1] and not any(done for _, done in replies[:-1])
    sent = fake.requests[0]
    assert sent["model"] == "tuned" and sent["messages"] == messages and sent["stream"] is True
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"]) == (0.7, 0.9, 33, ["\n\n", "END"])
    assert fake.auth == "Bearer server-side-key"


def test_stats_use_the_servers_token_count_else_count_chunks(fake):
    settings = GenerationSettings()
    final = list(stream_reply(make_client(fake.base_url), "base", [{"role": "user", "content": "q"}], settings))[-1]
    assert final.stats.tokens == 7 and final.stats.time_to_first_token_s > 0 and final.stats.tokens_per_s > 0
    fake.usage = False
    final = list(stream_reply(make_client(fake.base_url), "base", [{"role": "user", "content": "q"}], settings))[-1]
    assert final.stats.tokens == 3
    assert "tokens/s" in Stats(0.012, 3, 250.0).summary()


def test_no_stop_list_is_sent_as_none(fake):
    list(stream_reply(make_client(fake.base_url), "base", [{"role": "user", "content": "q"}], GenerationSettings()))
    assert fake.requests[0].get("stop") is None


def test_endpoint_down_becomes_a_sentence_not_an_exception():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    replies = list(stream_reply(make_client(f"http://127.0.0.1:{port}/v1"), "m",
                                [{"role": "user", "content": "q"}], GenerationSettings()))
    assert len(replies) == 1 and replies[0].done and replies[0].stats is None
    assert "Cannot reach the endpoint" in replies[0].error and str(port) in replies[0].error


def test_server_error_message_reaches_the_chat(fake):
    fake.status = 404
    reply = list(stream_reply(make_client(fake.base_url), "x", [{"role": "user", "content": "q"}],
                              GenerationSettings()))[-1]
    assert "does not exist" in reply.error


def test_model_list_is_sorted_and_fresh(fake):
    client = make_client(fake.base_url)
    assert list_models(client) == {"base": {}, "tuned": {}}
    fake.models = ("tuned", "promoted", "base")
    assert list(list_models(client)) == ["base", "promoted", "tuned"]


def test_scores_are_shown_for_the_models_that_have_them():
    listed = {"base": {}, "tuned": {"exact_match": 0.98, "eval_loss": 0.01234567}}
    assert describe_scores(listed) == "- `tuned`: eval_loss 0.01235 · exact_match 0.98"


def test_side_by_side_yields_both_answers_until_both_end(fake):
    client, settings = make_client(fake.base_url), GenerationSettings()
    messages = [{"role": "user", "content": "q"}]
    updates = list(side_by_side([stream_reply(client, "base", messages, settings),
                                 stream_reply(client, "tuned", messages, settings)]))
    assert [r.text for r in updates[-1]] == ["Twelve layers.", "Twelve layers."]
    assert all(r.done for r in updates[-1]) and len(fake.requests) == 2
    assert {req["model"] for req in fake.requests} == {"base", "tuned"}


def _logs_in(check, user: str, password: str) -> bool:
    return asyncio.run(check(user, password))  # Gradio awaits the page's login check


def test_users_file_holds_salted_hashes_not_passwords(tmp_path):
    path = tmp_path / "chat-users"
    add_user(path, "ada", "lovelace")
    add_user(path, "alan", "lovelace")
    users = read_users_file(path)
    assert "lovelace" not in path.read_text() and path.stat().st_mode & 0o777 == 0o600
    assert users["ada"].startswith("scrypt$") and users["ada"] != users["alan"]  # salted
    assert verify_password("lovelace", users["ada"]) and not verify_password("Lovelace", users["ada"])
    add_user(path, "ada", "analytical")  # a new password replaces the line, the others stay
    users = read_users_file(path)
    assert list(users) == ["ada", "alan"] and verify_password("analytical", users["ada"])


def test_a_plaintext_line_in_the_users_file_is_refused_without_echo(tmp_path):
    path = tmp_path / "chat-users"
    path.write_text("# who may chat\nalan:enigma\n")
    with pytest.raises(UsersError) as error:
        read_users_file(path)
    assert f"{path}:2" in str(error.value) and "attune chat-user add" in str(error.value)
    assert "enigma" not in str(error.value)
    with pytest.raises(UsersError) as error:
        page_login("login", "127.0.0.1", environ={"ATTUNE_CHAT_USERS": "no-password-here"})
    assert "no-password-here" not in str(error.value)


def test_login_from_a_hashed_file_and_plain_users(tmp_path):
    path = tmp_path / "chat-users"
    add_user(path, "ada", "lovelace")
    check = page_login("login", "0.0.0.0", environ={"ATTUNE_CHAT_USERS": "grace:cobol",
                                                    "ATTUNE_CHAT_USERS_FILE": str(path)})
    assert _logs_in(check, "ada", "lovelace") and _logs_in(check, "grace", "cobol")
    for user, password in [("ada", "cobol"), ("grace", "lovelace"), ("nobody", "lovelace"), ("ada", "")]:
        assert not _logs_in(check, user, password), (user, password)
    add_user(path, "alan", "enigma")  # a changed file (a rotated Secret) counts from the next login
    assert _logs_in(check, "alan", "enigma")
    assert _logs_in(page_login("login", "0.0.0.0", str(path), environ={}), "alan", "enigma")


def test_an_open_page_only_on_loopback_or_when_said(tmp_path):
    assert page_login("login", "127.0.0.1", environ={}) is None  # a laptop
    assert page_login("login", "localhost", environ={}) is None
    with pytest.raises(UsersError, match="auth: none"):
        page_login("login", "0.0.0.0", environ={})
    assert page_login("none", "0.0.0.0", environ={}) is None  # open on purpose
    with pytest.raises(OSError):  # a users file named but missing is an error, not an open page
        page_login("login", "0.0.0.0", str(tmp_path / "missing"), environ={})


def test_chat_user_add_command(tmp_path, monkeypatch, capsys):
    from attune.cli import main

    path = tmp_path / "chat-users"
    monkeypatch.setattr("sys.stdin", io.StringIO("lovelace\n"))
    assert main(["chat-user", "add", str(path), "ada", "--password-stdin"]) == 0
    answers = iter(["enigma", "enigma", "one", "other"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert main(["chat-user", "add", str(path), "alan"]) == 0
    assert main(["chat-user", "add", str(path), "grace"]) == 2  # the two prompts differ
    assert "do not match" in capsys.readouterr().err
    users = read_users_file(path)
    assert list(users) == ["ada", "alan"]
    assert verify_password("lovelace", users["ada"]) and verify_password("enigma", users["alan"])


def test_chat_command_refuses_an_open_page_on_a_network(tmp_path, monkeypatch, capsys):
    from attune.cli import main

    launched = []
    monkeypatch.setattr("attune.ui.launch_page", lambda page, **kw: launched.append(kw))
    monkeypatch.delenv("ATTUNE_CHAT_USERS", raising=False)
    monkeypatch.delenv("ATTUNE_CHAT_USERS_FILE", raising=False)
    assert main(["chat", "--host", "0.0.0.0"]) == 2 and not launched
    assert "--auth none" in capsys.readouterr().err
    assert main(["chat", "--host", "0.0.0.0", "--auth", "none"]) == 0
    users = tmp_path / "chat-users"
    add_user(users, "ada", "lovelace")
    assert main(["chat", "--host", "0.0.0.0", "--users-file", str(users)]) == 0
    assert [(kw["auth"], kw["users_file"]) for kw in launched] == [("none", None), ("login", str(users))]


def test_attune_chat_builds_the_page_from_one_config(monkeypatch):
    """The flags become a PageConfig, the same config the Serve app takes as its args."""
    from attune.cli import main
    from attune.ui.config import PageConfig

    built = []
    monkeypatch.setattr("attune.ui.build_page_from_config", built.append)
    monkeypatch.setattr("attune.ui.launch_page", lambda page, **kw: None)
    assert main(["chat", "--model", "tuned", "--compare-model", "base", "--auth", "none",
                 "--no-feedback"]) == 0
    assert built == [PageConfig(model="tuned", compare_model="base", auth="none", feedback=False)]
    assert all(field.description for field in PageConfig.model_fields.values())


def test_serve_builder_checks_its_args():
    from attune.ui import build_app

    assert build_app({"endpoint": "http://127.0.0.1:8000/v1", "model": "tiny-full"}) is not None
    with pytest.raises(ValueError):
        build_app({"endpoint": "http://x/v1", "modle": "typo"})
    assert build_app({"auth": "none", "users_file": "/var/run/secrets/attune-chat/users"}) is not None
    with pytest.raises(ValueError):
        build_app({"auth": "open"})


def test_the_page_client_is_built_with_the_installed_openai_and_its_own_timeout_type():
    """The client's HTTP stack is openai's choice (httpx2 since openai 3.x); a timeout object of
    another library is refused by it, and the page did not start."""
    client = make_client("http://127.0.0.1:9/v1")
    assert isinstance(client.timeout, openai.Timeout)
    assert (client.timeout.connect, client.timeout.read, client.max_retries) == (5.0, 60.0, 0)
