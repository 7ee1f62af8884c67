"""Engine-side work of the OpenAI-compatible API: the batch kinds it adds to the server's batcher.

``dispatch.run_engine_batch`` runs these kinds like ``predict`` and ``generate``: inside the dynamic batcher (the
plain server's or a Ray replica's, ``dispatch.engine_batcher``), so requests for different adapters that arrive
together share one forward or one ``generate`` call. Payloads start with the task (adapter) name, as every payload
does; each reaches the batch as a :class:`Costed`, tokenized once before the engine lock
(``dispatch.encode_payloads``).

- ``"oai_complete"``: ``(task, prompt, stop)`` where ``prompt`` is a string or a chat (a tuple of
  ``(role, content)``, rendered with the tokenizer's chat template); gives a :class:`Completion`.
- ``"oai_stream"``: ``(task, prompt, stop, sink)``, the same, and every new token is handed to ``sink(choice,
  token_id)`` from the generation thread as it is made (:class:`BatchStreamer`).
- ``"oai_pool"``: ``(task, text)``: a prediction plus the input's token count (:class:`Pooled`).

:func:`stream_completion` turns an ``oai_stream`` submission into text deltas (incremental detokenisation and stop
strings, :class:`ChoiceText`); the local server and each Ray replica run it next to their engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bitfit_peft.serving.encoding import Encoded
from bitfit_peft.serving.engine import MultiTaskEngine
from bitfit_peft.serving.errors import EngineError

__all__ = ["KINDS", "BatchStreamer", "ChoiceText", "Completion", "Costed", "Pooled", "render_prompt",
           "stream_completion"]

Sink = Callable[[int, int], None]  #: (choice index, token id), called from the generation thread


@dataclass(frozen=True)
class Costed:
    """A payload of this API, kept whole (stop strings, a stream's sink), with its tokenized input (its cost, and
    the tokens the engine runs and ``usage`` counts)."""

    task: str
    payload: tuple
    encoded: Encoded

    @property
    def cost(self) -> int:
        return self.encoded.cost

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded.features["input_ids"])


@dataclass
class Completion:
    """``n`` choices for one prompt: texts cut at a stop string, why each ended, and token counts."""

    task: str
    texts: list[str]
    finish_reasons: list[str]  #: "stop" (end-of-sequence token or a stop string) or "length"
    completion_tokens: list[int]
    prompt_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Pooled:
    """A prediction (classification / regression / embedding) and its input's token count."""

    prediction: dict[str, Any]
    prompt_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.prediction, "prompt_tokens": self.prompt_tokens}


class ChoiceText:
    """The text of one choice as tokens arrive: decoded incrementally, cut at the first stop string, and never
    showing text that could still turn into a stop string (or a half-decoded character)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        """Take one token; return the text that became safe to show."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = full[:cut], True
            return self._release(len(self.text))
        self.text = full
        hold = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        return self._release(len(full) - hold)

    def _release(self, upto: int) -> str:
        out = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    def rest(self) -> str:
        """What is still held back (at the end of the generation)."""
        return self._release(len(self.text))


def render_prompt(tokenizer: Any, prompt: str | Sequence[Sequence[str]]) -> str:
    """``prompt`` as text: a chat goes through the tokenizer's chat template (with the generation prompt)."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise EngineError("The base model's tokenizer has no chat template; use /v1/completions with a plain prompt, "
                          "or serve a base whose tokenizer_config.json sets chat_template.")
    messages = [{"role": role, "content": content} for role, content in prompt]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):  # the tokenizer adds it again when encoding
        text = text[len(bos):]
    return text


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


class BatchStreamer:
    """A ``generate`` streamer for a whole mixed batch: hands each row's new tokens to its request's sink.

    ``generate`` first puts the (expanded) prompt, a 2-D tensor, then one token per row and step; a row that has
    produced an end-of-sequence token gets padding afterwards, which is not passed on.
    """

    def __init__(self, sinks: Sequence[Sink | None], n: int, eos: set[int]) -> None:
        self.sinks, self.n, self.eos = list(sinks), n, eos
        self.done = [False] * (len(self.sinks) * n)

    def put(self, value: Any) -> None:
        if value.dim() > 1:
            return
        for row, token in enumerate(value.tolist()):
            if self.done[row]:
                continue
            self.done[row] = token in self.eos
            sink = self.sinks[row // self.n]
            if sink is not None:
                sink(row % self.n, token)

    def end(self) -> None:
        pass


def _eos(engine: MultiTaskEngine) -> set[int]:
    return engine.inference._eos_ids()  # the engine's own end-of-sequence set (one home)


def _complete(engine: MultiTaskEngine, settings: tuple, items: list[Costed]) -> list[Completion]:
    tokenizer, opts = engine.tokenizer, dict(settings)
    payloads = [it.payload for it in items]
    n = int(opts.get("num_return_sequences", 1))
    eos = _eos(engine)
    streamer = BatchStreamer([p[3] if len(p) > 3 else None for p in payloads], n, eos)
    generations = engine.inference.generate_encoded([it.encoded for it in items], **opts,
                                                    streamer=streamer if any(streamer.sinks) else None)
    counts = [it.prompt_tokens for it in items]
    results = []
    for payload, gen, count in zip(payloads, generations, counts, strict=True):
        texts, reasons, lengths = [], [], []
        for ids, text in zip(gen.token_ids, gen.texts, strict=True):
            stop = tuple(payload[2])
            if stop and any(s in text for s in stop):
                choice = ChoiceText(tokenizer, stop)
                for token in ids:
                    choice.add(token)
                    if choice.stopped:
                        break
                texts.append(choice.text)
                reasons.append("stop")
                lengths.append(len(choice.ids))
                continue
            texts.append(text)
            reasons.append("stop" if ids and ids[-1] in eos else "length")
            lengths.append(len(ids))
        results.append(Completion(payload[0], texts, reasons, lengths, count))
    return results


def _pool(engine: MultiTaskEngine, settings: tuple, items: list[Costed]) -> list[Pooled]:
    predictions = engine.inference.predict_encoded([it.encoded for it in items])
    return [Pooled(pred.to_dict(), it.prompt_tokens) for pred, it in zip(predictions, items, strict=True)]


#: kind -> runner(engine, settings, items) -> one result (with ``to_dict``) per item
KINDS: dict[str, Callable[[MultiTaskEngine, tuple, list[Costed]], Sequence[Any]]] = {
    "oai_complete": _complete,
    "oai_stream": _complete,
    "oai_pool": _pool,
}


async def stream_completion(
    submit: Callable[[list[tuple]], Awaitable[list[Any]]],
    tokenizer: Any,
    payloads: Sequence[tuple[str, Any, tuple[str, ...]]],
) -> AsyncIterator[tuple]:
    """Run ``payloads`` as one ``oai_stream`` submission and yield ``("delta", prompt, choice, text)`` as tokens
    arrive, then ``("done", [completion dicts])``; an error before the end is raised from the iteration.

    ``submit(payloads_with_sinks)`` queues them (the batcher's or a replica's batch) and returns their results.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple | None] = asyncio.Queue()

    def sink_for(index: int) -> Sink:
        return lambda choice, token: loop.call_soon_threadsafe(queue.put_nowait, (index, choice, token))

    future = asyncio.ensure_future(submit([(*p[:3], sink_for(i)) for i, p in enumerate(payloads)]))
    future.add_done_callback(lambda _: queue.put_nowait(None))  # after every token (same loop, FIFO)
    choices: dict[tuple[int, int], ChoiceText] = {}
    try:
        while (item := await queue.get()) is not None:
            index, choice, token = item
            text = choices.setdefault((index, choice), ChoiceText(tokenizer, payloads[index][2])).add(token)
            if text:
                yield ("delta", index, choice, text)
        results = [r.to_dict() if hasattr(r, "to_dict") else r for r in await future]
    finally:
        if not future.done():
            future.cancel()
    for index, result in enumerate(results):
        for choice, final in enumerate(result["texts"]):
            seen = choices.get((index, choice))
            rest = final[seen.sent:] if seen is not None else final
            if rest:
                yield ("delta", index, choice, rest)
    yield ("done", results)
