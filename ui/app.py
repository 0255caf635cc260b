"""The chat page's entry point: the same page as `attune chat`, for `python ui/app.py` / `gradio ui/app.py`.

    .venv/bin/python ui/app.py                      # endpoint from ATTUNE_ENDPOINT, else :8000/v1
    ATTUNE_ENDPOINT=http://127.0.0.1:8011/v1 ATTUNE_CHAT_MODEL=tiny-full .venv/bin/python ui/app.py
    ATTUNE_CHAT_HOST=0.0.0.0 ATTUNE_CHAT_USERS_FILE=chat-users .venv/bin/python ui/app.py   # login

The logic lives in attune.ui; this file only reads the environment into the page's config
(attune.ui.config.PageConfig).
"""

import os

from attune.ui import build_page_from_config, launch_page
from attune.ui.config import PageConfig
from attune.ui.endpoint import default_endpoint

config = PageConfig(endpoint=default_endpoint(),
                    model=os.environ.get("ATTUNE_CHAT_MODEL"),
                    compare_model=os.environ.get("ATTUNE_CHAT_COMPARE_MODEL"),
                    auth=os.environ.get("ATTUNE_CHAT_AUTH", "login"),  # "none": open off loopback too
                    feedback=False)
demo = build_page_from_config(config)

if __name__ == "__main__":
    launch_page(demo, host=os.environ.get("ATTUNE_CHAT_HOST", "127.0.0.1"),
                port=int(os.environ.get("ATTUNE_CHAT_PORT", "7860")), auth=config.auth,
                users_file=config.users_file)
