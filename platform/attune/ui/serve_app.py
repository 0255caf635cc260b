"""The chat page as a Ray Serve application, beside the endpoint in the same Serve instance.

    serve run attune.ui:build_app endpoint=http://127.0.0.1:8000/v1 model=tiny-full

A Serve config (or a RayService's serveConfigV2) lists it as a second application:

    - name: chat
      route_prefix: /chat
      import_path: attune.ui:build_app
      args: {endpoint: "http://127.0.0.1:8000/v1", model: tiny-full, users_file: /etc/attune/chat-users}

The page calls the API through the Serve proxy like any client. Its key (api_key_file, else
ATTUNE_API_KEY) and its users (users_file, else ATTUNE_CHAT_USERS / ATTUNE_CHAT_USERS_FILE) come
from mounted files or the replica's environment, never from args that end up in logs. With no
user it starts only when Serve listens on a loopback address, or with `auth: none`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from ray import serve
from ray.serve.context import _get_global_client

from attune.config import StrictConfig
from attune.ui.endpoint import DEFAULT_ENDPOINT
from attune.ui.users import page_login


class ChatAppArgs(StrictConfig):
    """The args of the chat page's Serve application."""

    endpoint: str = Field(DEFAULT_ENDPOINT, description="OpenAI-compatible base URL, ending in /v1.")
    model: str | None = Field(None, description="Model selected when the page opens (if served).")
    compare_model: str | None = Field(None, description="Second model selected for compare mode.")
    title: str = Field("attune chat", description="Page title.")
    api_key_file: str | None = Field(None, description="File holding the endpoint's key (a "
                                     "mounted Secret); else ATTUNE_API_KEY from the environment.")
    auth: Literal["login", "none"] = Field(
        "login", description="login: users sign in (users_file or ATTUNE_CHAT_USERS[_FILE]); with "
        "none configured the page starts only if Serve listens on loopback. none: open to anyone "
        "who reaches it, using the page's API key; must be said explicitly.")
    users_file: str | None = Field(None, description="File of user:scrypt$... lines (a mounted "
                                   "Secret; `attune chat-user add` writes it), read at each login; "
                                   "else ATTUNE_CHAT_USERS_FILE from the environment.")
    feedback: bool = Field(True, description="Answers take thumbs up/down and corrections.")
    feedback_db: str | None = Field(None, description="URL of the feedback database: "
                                    "postgresql://... (a server every replica shares, on a "
                                    "cluster) or any SQLAlchemy URL; else ATTUNE_FEEDBACK_DB (on "
                                    "Kubernetes: from a Secret), else sqlite under the replica's "
                                    "ATTUNE_HOME. Not here if it holds a password: args are logged.")


@serve.deployment(ray_actor_options={"num_cpus": 0})  # the page waits on the endpoint; no CPU of its own
@serve.ingress()
class ChatPage:
    async def __init__(self, **args):
        self.args = ChatAppArgs(**args)
        # Who can reach the page is where Serve listens (the controller knows; we run in a replica).
        http = await _get_global_client()._controller.get_http_config.remote()
        self.login = page_login(self.args.auth, http.host, self.args.users_file)

    def __serve_build_asgi_app__(self):
        # Built in the replica: a Gradio app holds threads and locks that do not pickle.
        from fastapi import FastAPI

        from attune.ui.feedback import open_store
        from attune.ui.page import build_page, mount_page

        key_file = self.args.api_key_file
        api_key = (Path(key_file).read_text().split()[0]
                   if key_file and Path(key_file).is_file() else None)
        feedback = open_store(self.args.feedback_db) if self.args.feedback else None
        page = build_page(self.args.endpoint, model=self.args.model, api_key=api_key,
                          compare_model=self.args.compare_model, title=self.args.title,
                          feedback=feedback)
        return mount_page(FastAPI(), page, login=self.login)


def build_app(args: dict | None = None) -> serve.Application:
    return ChatPage.bind(**ChatAppArgs(**(args or {})).model_dump())
