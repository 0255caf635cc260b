"""The chat page's one config, however the page runs: `attune chat` fills it from its flags,
ui/app.py from the environment, and the page's Serve application takes it as its args (a Serve
config's `args:`, a RayService's serveConfigV2). `build_page_from_config` (page.py) is the
builder all three call.

    config = PageConfig(endpoint="http://127.0.0.1:8000/v1", model="tiny-full")
    page = build_page_from_config(config)

Where the page listens is not here: `attune chat --host/--port`, ui/app.py's environment, or
Serve's own HTTP options.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from attune.config import StrictConfig
from attune.ui.endpoint import DEFAULT_ENDPOINT


class PageConfig(StrictConfig):
    """The chat page: the endpoint it talks to, who may open it, where its feedback goes."""

    endpoint: str = Field(DEFAULT_ENDPOINT, description="OpenAI-compatible base URL, ending in /v1.")
    model: str | None = Field(None, description="Model selected when the page opens (if served; "
                              "else the first listed).")
    compare_model: str | None = Field(None, description="Second model selected for compare mode.")
    title: str = Field("attune chat", description="Page title.")
    api_key_file: str | None = Field(None, description="File holding the endpoint's key (on a "
                                     "cluster, a mounted Secret); else ATTUNE_API_KEY from the "
                                     "environment. Never the key itself: a Serve app's args are "
                                     "logged.")
    auth: Literal["login", "none"] = Field(
        "login", description="login: users sign in (users_file or ATTUNE_CHAT_USERS[_FILE]); with "
        "none configured the page starts only where it listens on loopback. none: open to anyone "
        "who reaches it, using the page's API key; must be said explicitly.")
    users_file: str | None = Field(None, description="File of user:scrypt$... lines (on a cluster, "
                                   "a mounted Secret; `attune chat-user add` writes it), read at "
                                   "each login; else ATTUNE_CHAT_USERS_FILE from the environment.")
    feedback: bool = Field(True, description="Answers take thumbs up/down and corrections.")
    feedback_db: str | None = Field(None, description="URL of the feedback database: "
                                    "postgresql://... (a server every replica shares, on a "
                                    "cluster) or any SQLAlchemy URL; else ATTUNE_FEEDBACK_DB (on "
                                    "Kubernetes: from a Secret), else sqlite under ATTUNE_HOME. "
                                    "Not in a Serve app's args if it holds a password: args are "
                                    "logged.")
