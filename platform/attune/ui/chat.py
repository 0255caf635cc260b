"""The chat function: one streamed answer from one model, with its timing.

    for reply in stream_reply(client, "tiny-full", messages_for(turns, "Hi", settings), settings):
        print(reply.text)

A conversation is a list of `Turn`s (what the user said, what the model answered, how fast).
Failed turns stay on screen but are left out of what the model sees next time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai

from attune.ui.endpoint import describe_error


@dataclass(frozen=True)
class GenerationSettings:
    system_prompt: str = ""
    """Sent first as a system message when not empty."""
    temperature: float = 0.0
    """0 is greedy: the fine-tuned tiny model then repeats what it was taught."""
    top_p: float = 1.0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    """Strings that end the answer (one per line in the page)."""


@dataclass(frozen=True)
class Stats:
    time_to_first_token_s: float
    tokens: int
    tokens_per_s: float

    def summary(self) -> str:
        return (f"first token {self.time_to_first_token_s * 1000:.0f} ms · "
                f"{self.tokens_per_s:.0f} tokens/s · {self.tokens} tokens")


@dataclass
class Turn:
    user: str
    answer: str = ""
    stats: Stats | None = None
    error: str | None = None
    model: str | None = None
    """The model that answered."""
    asked: list[dict] = field(default_factory=list)
    """The messages it answered: system prompt, earlier turns, this question."""
    settings: GenerationSettings | None = None
    """The sampling settings of the answer."""
    original: str | None = None
    """The model's own answer once a person has corrected it (the correction is `answer`)."""


@dataclass
class Reply:
    """The answer so far; `done` once the stream has ended (or failed)."""
    text: str = ""
    stats: Stats | None = None
    error: str | None = None
    done: bool = False
    _chunks: int = field(default=0, repr=False)


def messages_for(turns: list[Turn], message: str, settings: GenerationSettings) -> list[dict]:
    """OpenAI messages: system prompt, the successful turns so far, then the new message."""
    messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt.strip() else []
    for turn in turns:
        if turn.error is None:
            messages += [{"role": "user", "content": turn.user},
                         {"role": "assistant", "content": turn.answer}]
    return messages + [{"role": "user", "content": message}]


def stream_reply(client: openai.OpenAI, model: str, messages: list[dict],
                 settings: GenerationSettings) -> Iterator[Reply]:
    """Yield the growing answer as tokens arrive; errors end the stream as a Reply with `.error`."""
    reply = Reply()
    start = time.perf_counter()
    first = last = None
    usage_tokens = None
    try:
        stream = client.chat.completions.create(
            model=model, messages=messages, stream=True,
            temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_tokens,
            stop=list(settings.stop) or None,
            stream_options={"include_usage": True})  # the exact token count, in the last chunk
        for chunk in stream:
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                last = time.perf_counter()
                first = first or last
                reply.text += delta
                reply._chunks += 1
                yield reply
    except Exception as e:  # noqa: BLE001 - the chat shows every failure as a sentence, never a traceback
        reply.error = describe_error(e, str(client.base_url).rstrip("/"))
    end = time.perf_counter()
    if first is not None:
        reply.stats = _stats(start, first, last or end, usage_tokens or reply._chunks)
    reply.done = True
    yield reply


def _stats(start: float, first: float, last: float, tokens: int) -> Stats:
    # Tokens/s is the decode rate after the first token (the first one is time-to-first-token's);
    # a one-token answer has no decode phase, so count it over the whole request.
    decode_s = last - first
    rate = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else tokens / max(last - start, 1e-9)
    return Stats(time_to_first_token_s=first - start, tokens=tokens, tokens_per_s=rate)
