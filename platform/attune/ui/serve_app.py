"""The chat page as a Ray Serve application, beside the endpoint in the same Serve instance.

    serve run attune.ui:build_app endpoint=http://127.0.0.1:8000/v1 model=tiny-full

A Serve config (or a RayService's serveConfigV2) lists it as a second application:

    - name: chat
      route_prefix: /chat
      import_path: attune.ui:build_app
      args: {endpoint: "http://127.0.0.1:8000/v1", model: tiny-full, users_file: /etc/attune/chat-users}

The args are the page's config (PageConfig, ui/config.py), as `attune chat` and ui/app.py fill
it. The page calls the API through the Serve proxy like any client. Its key (api_key_file, else
ATTUNE_API_KEY) and its users (users_file, else ATTUNE_CHAT_USERS / ATTUNE_CHAT_USERS_FILE) come
from mounted files or the replica's environment, never from args that end up in logs. With no
user it starts only when Serve listens on a loopback address, or with `auth: none`.
"""

from __future__ import annotations

from ray import serve

from attune.ray_internals import get_global_client
from attune.ui.config import PageConfig
from attune.ui.users import page_login


@serve.deployment(ray_actor_options={"num_cpus": 0})  # the page waits on the endpoint; no CPU of its own
@serve.ingress()
class ChatPage:
    async def __init__(self, **args):
        self.config = PageConfig(**args)
        # Who can reach the page is where Serve listens (the controller knows; we run in a replica).
        http = await get_global_client()._controller.get_http_config.remote()
        self.login = page_login(self.config.auth, http.host, self.config.users_file)

    def __serve_build_asgi_app__(self):
        # Built in the replica: a Gradio app holds threads and locks that do not pickle.
        from fastapi import FastAPI

        from attune.ui.page import build_page_from_config, mount_page

        return mount_page(FastAPI(), build_page_from_config(self.config), login=self.login)


def build_app(args: dict | None = None) -> serve.Application:
    """Serve builder: the args are a PageConfig (unknown keys are errors)."""
    return ChatPage.bind(**PageConfig(**(args or {})).model_dump())
