"""The Gradio chat over attune's OpenAI-compatible endpoint (or any compatible server).

    attune chat --endpoint http://127.0.0.1:8000/v1      # the page alone
    serve run attune.ui:build_app                         # the page as a Ray Serve application

endpoint.py  client, model list, errors in words     chat.py     one streamed answer + its stats
compare.py   two answers streaming side by side       page.py     the Gradio layout and events
users.py     who may open the page (login or not)     passwords.py  the users file: salted hashes
feedback.py  thumbs and corrections of answers      serve_app.py  the page as a Serve application
config.py    the page's config (PageConfig), one for `attune chat`, ui/app.py and serve_app.py;
             page.py's build_page_from_config is the builder all three call
"""



def __getattr__(name: str):
    if name in ("build_page", "build_page_from_config", "launch_page"):
        # Gradio loads only where a page is built: every `attune` command imports
        # attune.ui.endpoint for its defaults, and gradio's import takes seconds.
        from attune.ui import page

        return getattr(page, name)
    raise AttributeError(f"module 'attune.ui' has no attribute {name!r}")


def build_app(args: dict | None = None):
    """Serve builder (import_path attune.ui:build_app)."""
    # Ray is loaded only when the page is served by Ray: `attune chat` starts without it.
    from attune.ui.serve_app import build_app as build

    return build(args)


__all__ = ["build_app", "build_page", "build_page_from_config", "launch_page"]
