"""OpenAI response bodies and server-sent events, assembled from engine outputs.

The handlers (`spinquant_server.handlers`) turn a request into engine jobs, one per
choice: ``(choice index, prompt token ids, SamplingOptions, request id)``.
`merge_outputs` runs them at once; `CompletionBuilder` and `ChatBuilder` fold the
outputs into one OpenAI body (``collect``) or a stream of SSE events (``stream``,
ending with ``data: [DONE]``). Token and prompt counts go to the server's metrics.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from spinquant_server.engine import Engine, GenerationOutput, SamplingOptions, TokenLogprob
from spinquant_server.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from spinquant_server.state import Metrics

logger = logging.getLogger(__name__)

#: (choice index, prompt token ids, sampling options, engine request id)
EngineJob = tuple[int, list[int], SamplingOptions, str]


@dataclass
class Job:
    """One prompt of a request, tokenized and checked.

    Attributes:
        text: the prompt as text (decoded when the request sent token ids).
        ids: its token ids.
    """
    text: str
    ids: list[int]


def decode(tokenizer: Any, ids: list[int]) -> str:
    """Token ids -> text, special tokens kept and no clean-up (the text the ids stand for)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


async def merge_outputs(engine: Engine, jobs: list[EngineJob]
                        ) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Run several sequences at once; yield (choice index, output) as they arrive.

    Leaving early (exception, cancellation, closing) cancels every sequence.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int], options: SamplingOptions, rid: str) -> None:
        try:
            async for out in engine.generate(ids, options, rid):
                queue.put_nowait((index, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which decides
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(*job)) for job in jobs]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event ``data: <json>`` and its blank line."""
    # ASCII-only JSON: generated text may hold U+2028 / U+0085, which line readers built on
    # str.splitlines (httpx's aiter_lines among them) take for line breaks.
    return f"data: {json.dumps(payload, ensure_ascii=True)}\n\n"


def engine_error(exc: Exception) -> OpenAIError:
    """An engine exception as the client's error: ValueError (a request the engine refuses) is a 400,
    anything else a 500 that names only the exception type (the details go to the log)."""
    if isinstance(exc, ValueError):
        return OpenAIError(400, str(exc), code="invalid_value")
    logger.error("engine failure: %s: %s", type(exc).__name__, exc)
    return OpenAIError(500, f"engine failure: {type(exc).__name__}", type="server_error", code="engine_error")


class CompletionLogprobs:
    """Accumulates OpenAI completions-style logprobs of one choice."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, entries: list[TokenLogprob | None], offset: int, prompt_first: str | None = None) -> int:
        """Append entries; `offset` is the text offset of the first. Returns the offset after them."""
        for e in entries:
            self.text_offset.append(offset)
            if e is None:  # the first prompt token: nothing predicts it
                token = prompt_first or ""
                self.tokens.append(token)
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
            else:
                token = e.token
                self.tokens.append(token)
                self.token_logprobs.append(e.logprob)
                top = {t: lp for _, t, lp in e.top}
                top.setdefault(e.token, e.logprob)
                self.top_logprobs.append(top)
            offset += len(token)
        return offset

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}

    def slice_from(self, start: int) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


class CompletionBuilder:
    """The answer of one /v1/completions request: ``len(jobs) * n`` choices, choice
    ``p * n + i`` being sample ``i`` of prompt ``p``.

    Args:
        engine: runs the sequences.
        metrics: counts prompt and generated tokens.
        req: the validated request.
        model: the served model name (echoed in the body).
        rid: the response id (``cmpl-...``).
        jobs: the request's prompts.
        n: choices per prompt.
        echo: prepend each prompt (and its logprobs) to its choices.
        score_only: max_tokens=0 with echo: the engine's one generated token is dropped.
    """

    def __init__(self, engine: Engine, metrics: Metrics, req: CompletionRequest, model: str, rid: str,
                 jobs: list[Job], n: int, echo: bool, score_only: bool) -> None:
        self.engine, self.metrics = engine, metrics
        self.req, self.model, self.rid, self.jobs, self.n = req, model, rid, jobs, n
        self.echo, self.score_only = echo, score_only
        self.created = int(time.time())
        self.want_logprobs = req.logprobs is not None
        count = len(jobs) * n
        self.text = [""] * count
        self.offset = [0] * count
        self.lps = [CompletionLogprobs() for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.completion_tokens = 0
        self.started = [False] * count

    def _job(self, index: int) -> Job:
        return self.jobs[index // self.n]

    def _absorb(self, index: int, out: GenerationOutput) -> tuple[str, int]:
        """Fold one output into choice `index`; returns (new text, index of its first new logprob)."""
        first_lp = len(self.lps[index].tokens)
        new = ""
        if not self.started[index]:
            self.started[index] = True
            if self.echo:
                job = self._job(index)
                new += job.text
                if self.want_logprobs and out.prompt_logprobs is not None:
                    self.offset[index] = self.lps[index].add(out.prompt_logprobs, 0,
                                                             prompt_first=decode(self.engine.tokenizer, job.ids[:1]))
                self.offset[index] = len(job.text)
        if self.score_only:
            # max_tokens=0 scoring: the one token the engine had to generate is dropped.
            self.finish[index] = "length" if out.finished else None
            self.text[index] += new
            return new, first_lp
        self.completion_tokens += len(out.token_ids)
        self.metrics.generated_tokens.inc(len(out.token_ids))
        new += out.text
        if self.want_logprobs and out.logprobs:
            self.offset[index] = self.lps[index].add(out.logprobs, self.offset[index])
        self.text[index] += new
        self.finish[index] = out.finish_reason
        return new, first_lp

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(j.ids) for j in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def _count_prompt(self) -> None:
        self.metrics.prompt_tokens.inc(sum(len(j.ids) for j in self.jobs))

    async def collect(self, engine_jobs: list[EngineJob]) -> dict[str, Any]:
        """Run the jobs; the whole OpenAI body. Engine errors raise `OpenAIError` (400 / 500)."""
        self._count_prompt()
        try:
            async for index, out in merge_outputs(self.engine, engine_jobs):
                self._absorb(index, out)
        except Exception as exc:  # noqa: BLE001 - engine errors become OpenAI errors (400 / 500)
            raise engine_error(exc) from exc
        choices = [{"index": i, "text": self.text[i],
                    "logprobs": self.lps[i].to_dict() if self.want_logprobs else None,
                    "finish_reason": self.finish[i]} for i in range(len(self.text))]
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage()}

    async def stream(self, engine_jobs: list[EngineJob]) -> AsyncIterator[str]:
        """Run the jobs; SSE events, ending with ``data: [DONE]`` (an engine error is an error event)."""
        self._count_prompt()
        base = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model}
        try:
            async for index, out in merge_outputs(self.engine, engine_jobs):
                new, first_lp = self._absorb(index, out)
                finish = self.finish[index]
                if not new and finish is None and not (self.want_logprobs and out.logprobs):
                    continue
                choice = {"index": index, "text": new,
                          "logprobs": self.lps[index].slice_from(first_lp) if self.want_logprobs else None,
                          "finish_reason": finish}
                yield sse({**base, "choices": [choice]})
        # The status line is already sent: an engine error ends the stream with an error event.
        except Exception as exc:  # noqa: BLE001
            yield sse(engine_error(exc).body())
        else:
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                yield sse({**base, "choices": [], "usage": self._usage()})
        yield "data: [DONE]\n\n"


def chat_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Engine logprob entries -> chat's ``logprobs.content`` items (with UTF-8 bytes)."""
    return [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode("utf-8")),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                              for _, t, lp in e.top]} for e in entries]


class ChatBuilder:
    """The answer of one /v1/chat/completions request: `n` choices over one rendered prompt.

    Args:
        engine: runs the sequences.
        metrics: counts prompt and generated tokens.
        req: the validated request.
        model: the served model name (echoed in the body).
        rid: the response id (``chatcmpl-...``).
        prompt_len: tokens of the rendered conversation.
        n: choices.
    """

    def __init__(self, engine: Engine, metrics: Metrics, req: ChatCompletionRequest, model: str, rid: str,
                 prompt_len: int, n: int) -> None:
        self.engine, self.metrics = engine, metrics
        self.req, self.model, self.rid, self.prompt_len, self.n = req, model, rid, prompt_len, n
        self.created = int(time.time())
        self.want_logprobs = bool(req.logprobs)
        self.text = [""] * n
        self.lps: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.completion_tokens = 0

    def _absorb(self, index: int, out: GenerationOutput) -> list[dict[str, Any]]:
        self.completion_tokens += len(out.token_ids)
        self.metrics.generated_tokens.inc(len(out.token_ids))
        self.text[index] += out.text
        self.finish[index] = out.finish_reason
        new_lps = chat_logprobs(out.logprobs) if (self.want_logprobs and out.logprobs) else []
        self.lps[index].extend(new_lps)
        return new_lps

    def _usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_len, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_len + self.completion_tokens}

    async def collect(self, engine_jobs: list[EngineJob]) -> dict[str, Any]:
        """Run the jobs; the whole OpenAI body. Engine errors raise `OpenAIError` (400 / 500)."""
        self.metrics.prompt_tokens.inc(self.prompt_len)
        try:
            async for index, out in merge_outputs(self.engine, engine_jobs):
                self._absorb(index, out)
        except Exception as exc:  # noqa: BLE001 - engine errors become OpenAI errors (400 / 500)
            raise engine_error(exc) from exc
        choices = [{"index": i, "message": {"role": "assistant", "content": self.text[i]},
                    "logprobs": {"content": self.lps[i]} if self.want_logprobs else None,
                    "finish_reason": self.finish[i]} for i in range(self.n)]
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage()}

    async def stream(self, engine_jobs: list[EngineJob]) -> AsyncIterator[str]:
        """Run the jobs; SSE events, ending with ``data: [DONE]`` (an engine error is an error event)."""
        self.metrics.prompt_tokens.inc(self.prompt_len)
        base = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        for i in range(self.n):
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        try:
            async for index, out in merge_outputs(self.engine, engine_jobs):
                new_lps = self._absorb(index, out)
                if not out.text and not out.finished and not new_lps:
                    continue
                delta = {"content": out.text} if out.text else {}
                yield sse({**base, "choices": [{"index": index, "delta": delta,
                                                 "logprobs": {"content": new_lps} if self.want_logprobs else None,
                                                 "finish_reason": out.finish_reason}]})
        # The status line is already sent: an engine error ends the stream with an error event.
        except Exception as exc:  # noqa: BLE001
            yield sse(engine_error(exc).body())
        else:
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                yield sse({**base, "choices": [], "usage": self._usage()})
        yield "data: [DONE]\n\n"

