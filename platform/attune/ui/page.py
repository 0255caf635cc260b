"""The chat page: a Gradio Blocks app over one OpenAI-compatible endpoint.

    page = build_page("http://127.0.0.1:8000/v1", model="tiny-full"); page.launch()
    page = build_page_from_config(config)   # the page's config (ui/config.py), as every caller has it

Left: model picker (filled from /v1/models, ↻ to refresh; `attune eval`'s scores of the models
that have them), compare mode, system prompt and
sampling parameters. Right: one chat panel, or two side by side in compare mode, each answer
followed by its time to first token, tokens/s and token count. The conversation of each panel
lives in a server-side gr.State as `Turn`s; the Chatbot only shows it. With a feedback store,
each answer takes a thumbs up or down and can be edited into a correction (`ui/feedback.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from attune.feedback import FeedbackStore
from attune.ui.chat import GenerationSettings, Reply, Turn, messages_for, stream_reply
from attune.ui import feedback as page_feedback
from attune.ui.compare import side_by_side
from attune.ui.config import PageConfig
from attune.ui.endpoint import describe_error, describe_scores, list_models, make_client
from attune.ui.users import Login, page_login

EXAMPLE_QUESTIONS = ["How many layers does BERT-base have?", "What is the hidden size of BERT-base?",
                     "Which family does BERT-base belong to?"]
_LIST_MARKER = re.compile(r"(?m)^(\s*\d+)([.)])")
_ESCAPED_LIST_MARKER = re.compile(r"(?m)^(\s*\d+)\\([.)])")
_STATS_LINE = re.compile(r"\s*<sub>[^<]*</sub>\s*$")
CORRECTED = "✎ corrected: what the model said is kept as feedback"
NO_MODEL = "No model selected: the endpoint listed none. Press ↻ Refresh models once it is up."


def build_page_from_config(config: PageConfig) -> gr.Blocks:
    """The page `config` describes, for `attune chat`, ui/app.py and the Serve application alike:
    its key read from `api_key_file`, its feedback database opened and brought up to date."""
    key_file = config.api_key_file
    api_key = (Path(key_file).read_text().split()[0]
               if key_file and Path(key_file).is_file() else None)
    feedback = page_feedback.open_store(config.feedback_db) if config.feedback else None
    return build_page(config.endpoint, model=config.model, compare_model=config.compare_model,
                      api_key=api_key, title=config.title, feedback=feedback)


def build_page(endpoint: str, *, model: str | None = None, compare_model: str | None = None,
               api_key: str | None = None, title: str = "attune chat",
               feedback: FeedbackStore | None = None) -> gr.Blocks:
    """The page; `model` / `compare_model` are selected when the endpoint serves them; marks
    and corrections of answers go to `feedback` (none: the answers take none)."""
    client = make_client(endpoint, api_key)  # the key stays in this closure, on the server

    def refresh_models(current_a: str | None, current_b: str | None):
        try:
            listed = list_models(client)
        except Exception as e:  # an unreachable endpoint is a status line, not a crash
            return gr.update(), gr.update(), f"⚠️ {describe_error(e, endpoint)}"
        models = list(listed)
        first = _pick(models, current_a, model)
        second = _pick([m for m in models if m != first] or models, current_b, compare_model)
        status = f"{len(models)} model{'s' if len(models) != 1 else ''} at `{endpoint}`"
        if scores := describe_scores(listed):  # `attune eval`'s, beside the pickers
            status += f"\n\nScores:\n{scores}"
        return (gr.update(choices=models, value=first), gr.update(choices=models, value=second), status)

    def respond(message, turns_a, turns_b, model_a, model_b, compare, *params):
        if not message or not message.strip():
            return
        settings = _settings(*params)
        models = [model_a, model_b] if compare else [model_a]
        conversations = [list(turns_a), list(turns_b)]
        asked = [messages_for(conversations[i], message, settings) for i in range(len(models))]
        streams = [_answer(client, m, asked[i], settings) for i, m in enumerate(models)]
        for conversation in conversations[:len(models)]:
            conversation.append(Turn(message))  # shown at once, filled in as tokens arrive
        yield "", _render(conversations[0]), _render(conversations[1]), *conversations
        for replies in side_by_side(streams):
            for i, reply in enumerate(replies):
                conversations[i][-1] = Turn(message, reply.text, reply.stats, reply.error,
                                            model=models[i], asked=asked[i], settings=settings)
            yield "", _render(conversations[0]), _render(conversations[1]), *conversations

    def retry(turns_a, turns_b, model_a, model_b, compare, *params):
        """Ask the last question again, in place of its answers."""
        if not turns_a:
            return
        turns_b = turns_b[:-1] if compare and turns_b else turns_b
        yield from respond(turns_a[-1].user, turns_a[:-1], turns_b, model_a, model_b, compare, *params)

    def rate(turns, liked: gr.LikeData, request: gr.Request):
        if (i := page_feedback.answered_turn(turns, liked.index)) is not None:
            if notice := page_feedback.rate(feedback, turns[i], liked.liked, request.username):
                gr.Warning(notice)  # the chat goes on; the person knows their mark is not kept

    def correct(turns, edit: gr.EditData, request: gr.Request):
        """An edited answer is a correction; an edited question is put back as it was asked."""
        turns = list(turns)
        if (i := page_feedback.answered_turn(turns, edit.index)) is not None:
            turns[i], notice = page_feedback.correct(feedback, turns[i], _answer_of(edit.value),
                                                     request.username)
            if notice:
                gr.Warning(notice)
        return _render(turns), turns

    with gr.Blocks(title=title, fill_height=True) as page:
        turns_a, turns_b = gr.State([]), gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                gr.Markdown(f"## {title}")
                model_a = gr.Dropdown(label="Model", choices=[], elem_id="model-a")
                refresh = gr.Button("↻ Refresh models", size="sm", elem_id="refresh-models")
                compare = gr.Checkbox(label="Compare with a second model", elem_id="compare")
                model_b = gr.Dropdown(label="Second model", choices=[], visible=False, elem_id="model-b")
                status = gr.Markdown(elem_id="endpoint-status")
                system_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p")
                    max_tokens = gr.Slider(1, 2048, value=128, step=1, label="Max tokens")
                    stop = gr.Textbox(label="Stop sequences (one per line)", lines=2)
            with gr.Column(scale=3):
                with gr.Row():
                    editable = "all" if feedback else None  # Gradio edits questions and answers alike
                    chat_a = gr.Chatbot(label="Answer", elem_id="chat-a", height=520, editable=editable,
                                        buttons=["copy", "copy_all"])
                    chat_b = gr.Chatbot(label="Second answer", elem_id="chat-b", height=520, visible=False,
                                        editable=editable, buttons=["copy", "copy_all"])
                with gr.Row():
                    message = gr.Textbox(placeholder="Ask something…", show_label=False, scale=5,
                                         autofocus=True, elem_id="message")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    stop_button = gr.Button("■ Stop", size="sm", elem_id="stop")
                    retry_button = gr.Button("↺ Retry", size="sm", elem_id="retry")
                    clear_button = gr.Button("✕ Clear", size="sm", elem_id="clear")
                gr.Examples(EXAMPLE_QUESTIONS, inputs=message, label="Questions the tiny model was taught")

        pickers = [model_a, model_b]
        page.load(refresh_models, pickers, [*pickers, status])
        refresh.click(refresh_models, pickers, [*pickers, status])
        compare.change(lambda on: (gr.update(visible=on), gr.update(visible=on)), compare, [model_b, chat_b])
        model_a.change(lambda m: gr.update(label=m or "Answer"), model_a, chat_a)
        model_b.change(lambda m: gr.update(label=m or "Second answer"), model_b, chat_b)

        inputs = [turns_a, turns_b, model_a, model_b, compare, system_prompt, temperature, top_p,
                  max_tokens, stop]
        outputs = [message, chat_a, chat_b, turns_a, turns_b]
        runs = [message.submit(respond, [message, *inputs], outputs),
                send.click(respond, [message, *inputs], outputs),
                retry_button.click(retry, inputs, outputs)]
        stop_button.click(None, cancels=runs)
        if feedback:
            for chat, turns in ((chat_a, turns_a), (chat_b, turns_b)):
                chat.like(rate, turns, None)
                chat.edit(correct, turns, [chat, turns])
        # The Chatbot's own trash icon clears only what it shows: forget the conversation too.
        for clearing in (clear_button.click, chat_a.clear, chat_b.clear):
            clearing(lambda: ([], [], [], []), None, [chat_a, chat_b, turns_a, turns_b], cancels=runs)
    page.queue(default_concurrency_limit=16)  # one page, many people chatting at once
    return page


def _answer(client, model: str | None, messages: list[dict],
            settings: GenerationSettings) -> Iterator[Reply]:
    if not model:
        yield Reply(error=NO_MODEL, done=True)
        return
    yield from stream_reply(client, model, messages, settings)


def _settings(system_prompt, temperature, top_p, max_tokens, stop) -> GenerationSettings:
    stops = tuple(line for line in (stop or "").splitlines() if line)
    return GenerationSettings(system_prompt=system_prompt or "", temperature=float(temperature),
                              top_p=float(top_p), max_tokens=int(max_tokens), stop=stops)


def _render(turns: list[Turn]) -> list[dict]:
    """Chatbot messages: every answer followed by its stats, errors as a warning."""
    messages = []
    for turn in turns:
        if turn.error:
            answer = f"⚠️ {turn.error}" + (f"\n\n{_as_text(turn.answer)}" if turn.answer else "")
        elif turn.stats:
            answer = f"{_as_text(turn.answer)}\n\n<sub>{turn.stats.summary()}</sub>"
        elif turn.original is not None:
            answer = f"{_as_text(turn.answer)}\n\n<sub>{CORRECTED}</sub>"
        else:
            answer = _as_text(turn.answer) or "…"
        messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": answer}]
    return messages


def _answer_of(shown) -> str:
    """The answer in an edited message, without what `_render` added to it."""
    if isinstance(shown, list):  # Gradio's content parts
        shown = "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in shown)
    elif isinstance(shown, dict):
        shown = shown.get("text") or shown.get("content") or ""
    text = _STATS_LINE.sub("", str(shown))
    return _ESCAPED_LIST_MARKER.sub(r"\1\2", text).strip()


def _as_text(answer: str) -> str:
    # Markdown reads a line like "12." as an empty ordered list starting at 12, and the answer
    # vanishes; escaping the dot keeps numbers as numbers (numbered lists then show as plain lines).
    return _LIST_MARKER.sub(r"\1\\\2", answer)


def _pick(models: list[str], *preferences: str | None) -> str | None:
    return next((p for p in preferences if p in models), models[0] if models else None)


def launch_page(page: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
                auth: str = "login", users_file: str | None = None) -> str:
    """Serve the page on its own; returns its address. Login as `page_login` has it."""
    page.launch(server_name=host, server_port=port, auth=page_login(auth, host, users_file),
                prevent_thread_lock=not block, footer_links=[], ssr_mode=False, quiet=True)
    return page.local_url


def mount_page(app, page: gr.Blocks, *, login: Login | None, path: str = "/"):
    """The page inside another ASGI app (the Serve deployment); `login` from `page_login`."""
    return gr.mount_gradio_app(app, page, path=path, auth=login, footer_links=[], ssr_mode=False)
