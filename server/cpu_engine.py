"""CPU reference engine: a transformers causal LM stepped by one worker thread.

The model is the SpinQuant fake-quant model rebuilt from a checkpoint
(`spinquant_offline.checkpoint.load_checkpoint`), a plain Hugging Face directory, or a
GGUF file. It is a reference, not a fast path: each running sequence keeps its own KV
cache and the worker advances the sequences round-robin, one token each per pass, so
requests join and leave between any two steps (continuous, unbatched). The event loop
only queues work and reads results; all model calls run on the worker thread.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from spinquant_server.engine import (CheckpointInfo, Engine, GenerationOutput, SamplingOptions,
                                     TokenLogprob, read_checkpoint_info)

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
# Positive temperatures below this are raised to it (as vLLM does): logits / 1e-300 overflow.
_MIN_TEMPERATURE = 1e-2
# Prompt tokens decoded together with the output so a tokenizer that drops a
# leading space when decoding from the start of a sequence keeps it here.
_DECODE_CONTEXT = 4


@dataclass
class _Sequence:
    """Worker-side state of one sequence; fields below `loop` belong to the worker thread."""
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    generator: torch.Generator
    aborted: threading.Event = field(default_factory=threading.Event)
    output_ids: list[int] = field(default_factory=list)
    cache: Any = None
    started: bool = False
    sent_chars: int = 0
    searched_chars: int = 0
    text: str = ""


class CPUEngine(Engine):
    """Serve a transformers causal LM on the CPU.

    Args:
        model: a causal LM (``model(input_ids, past_key_values=..., use_cache=...)`` returning
            ``.logits (1, L, V)``); put in eval mode here.
        tokenizer: its Hugging Face tokenizer.
        model_path: where it came from (reported by /v1/models).
        max_model_len: context limit; defaults to ``config.max_position_embeddings``; a
            larger value than the model's is refused.
        info: the checkpoint's `CheckpointInfo` (quantization settings, meta).
        use_kv_cache: decode with the model's KV cache (False recomputes the whole sequence each step).
        seed: seeds the generator that draws seeds for requests that give none.
        num_threads: torch intra-op threads of the worker (None: torch's default). For tiny
            models or shared machines 1 is much faster than an oversubscribed default.
    """

    kind = "cpu"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, model_path: str = "",
                 max_model_len: int | None = None, info: CheckpointInfo | None = None,
                 use_kv_cache: bool = True, seed: int = 0, num_threads: int | None = None) -> None:
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self._num_threads = num_threads
        self._model = model.eval()
        self._tokenizer = tokenizer
        self._path = model_path
        self._info = info
        self._use_kv_cache = use_kv_cache
        config = getattr(model, "config", None)
        model_max = getattr(config, "max_position_embeddings", None)
        if max_model_len is None:
            if model_max is None:
                raise ValueError("max_model_len must be given: the model config has no max_position_embeddings")
            max_model_len = int(model_max)
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        if model_max is not None and max_model_len > model_max:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's "
                             f"max_position_embeddings {model_max}")
        self._max_model_len = int(max_model_len)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        n_logits = int(out_emb.weight.shape[0]) if out_emb is not None else len(tokenizer)
        # Prompt ids must be embeddable and decodable.
        self._vocab_size = min(n_logits, len(tokenizer))
        self._eos_ids = self._collect_eos_ids(model, tokenizer)
        self._seed_gen = torch.Generator().manual_seed(seed)
        self._token_text: dict[int, str] = {}

        self._cond = threading.Condition()
        self._pending: list[_Sequence] = []
        self._active: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._stopping = False
        # None: the worker steps freely; k >= 0: k more passes, then it holds (see `hold`).
        self._passes_left: int | None = None
        self._thread: threading.Thread | None = None
        #: tokens sampled since construction (all sequences; written by the worker only)
        self.num_generated_tokens = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str, *, max_model_len: int | None = None,
                        dtype: torch.dtype = torch.float32, **kw: Any) -> "CPUEngine":
        """Load a SpinQuant checkpoint, a plain Hugging Face directory, or a GGUF file.

        A directory whose config.json carries ``quantization_config.quant_method ==
        "spinquant"`` is rebuilt as the fake-quant model by `spinquant_offline`.
        """
        info = read_checkpoint_info(path)
        if info.is_spinquant:
            from spinquant_offline.checkpoint import load_checkpoint
            model, tokenizer, _cfg = load_checkpoint(path, dtype=dtype)
        elif os.path.isfile(path):
            from spinquant_offline.model import load_model
            model, tokenizer = load_model(path, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model, tokenizer, model_path=path, max_model_len=max_model_len, info=info, **kw)

    @staticmethod
    def _collect_eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return ids

    # ------------------------------------------------------------------ Engine interface
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_in_flight(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._active)

    def model_info(self) -> dict[str, Any]:
        config = getattr(self._model, "config", None)
        archs = getattr(config, "architectures", None) or [type(self._model).__name__]
        dtype = next(self._model.parameters()).dtype
        return {"path": self._path, "architecture": archs[0], "dtype": str(dtype).replace("torch.", ""),
                "vocab_size": self._vocab_size, "max_model_len": self._max_model_len,
                "num_parameters": sum(p.numel() for p in self._model.parameters()),
                "kv_cache": self._use_kv_cache}

    def quantization_config(self) -> dict[str, Any] | None:
        return self._info.quantization_config if self._info is not None else None

    def checkpoint_meta(self) -> dict[str, Any] | None:
        return self._info.meta if self._info is not None else None

    async def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._worker, name="spinquant-cpu-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            for seq in self._pending + self._active:
                seq.aborted.set()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            # The worker finishes the step it is in (one forward pass) and exits.
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        with self._cond:
            self._thread = None

    async def check_health(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("CPU engine worker thread is not running")

    async def generate(self, prompt_token_ids: list[int], options: SamplingOptions,
                       request_id: str) -> AsyncIterator[GenerationOutput]:
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("prompt must hold at least one token, got 0")
        if len(ids) >= self._max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len {self._max_model_len} "
                             "leaves no room to generate")
        bad = [t for t in ids if not 0 <= t < self._vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self._vocab_size}), got {bad[:4]}")
        if self._thread is None:
            raise RuntimeError("CPU engine is not started (call start() first)")
        seed = options.seed if options.seed is not None else int(
            torch.randint(0, 2**62, (1,), generator=self._seed_gen))
        seq = _Sequence(request_id=request_id, prompt_ids=ids, options=options, queue=asyncio.Queue(),
                        loop=asyncio.get_running_loop(),
                        generator=torch.Generator().manual_seed(seed % 2**64))
        with self._cond:
            if self._stopping:
                raise RuntimeError("CPU engine is shutting down")
            if request_id in self._by_id:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._by_id[request_id] = seq
            self._pending.append(seq)
            self._cond.notify_all()
        finished = False
        try:
            while not finished:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                # Closed or cancelled by the consumer (client gone): the worker drops it.
                seq.aborted.set()
                with self._cond:
                    self._cond.notify_all()

    async def abort(self, request_id: str) -> None:
        with self._cond:
            seq = self._by_id.get(request_id)
            if seq is not None:
                seq.aborted.set()
                self._cond.notify_all()

    # ------------------------------------------------------------------ test hooks
    def hold(self, passes: int = 0) -> None:
        """Let the worker make `passes` more passes (one token for each running sequence per
        pass), then stop stepping until `release()`.

        While held, sequences stay in flight without generating; aborted or cancelled ones
        are still dropped (finish_reason "abort") and `shutdown` overrides the hold. Tests
        use it to keep requests in flight for as long as they look at them, so what they
        see does not depend on how fast the machine is.
        """
        if passes < 0:
            raise ValueError(f"hold needs passes >= 0, got {passes}")
        with self._cond:
            self._passes_left = passes
            self._cond.notify_all()

    def release(self) -> None:
        """End a `hold`: the worker steps freely again."""
        with self._cond:
            self._passes_left = None
            self._cond.notify_all()

    def wait_in_flight(self, count: int, timeout_s: float) -> bool:
        """Block the calling thread until exactly `count` sequences are in flight.

        Returns False if that did not happen within `timeout_s` seconds. Call it from a
        thread other than the event loop's (``asyncio.to_thread`` inside a coroutine):
        admitting and cancelling sequences needs the loop.
        """
        with self._cond:
            return self._cond.wait_for(lambda: len(self._pending) + len(self._active) == count, timeout_s)

    # ------------------------------------------------------------------ worker thread
    def _has_work(self) -> bool:
        """Whether the worker has something to do (called with `_cond` held)."""
        if self._stopping:
            return True
        if self._passes_left == 0:
            return any(seq.aborted.is_set() for seq in self._pending + self._active)
        return bool(self._pending or self._active)

    def _worker(self) -> None:
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._cond.wait_for(self._has_work)
                    if self._stopping and not (self._pending or self._active):
                        return
                    self._active.extend(self._pending)
                    self._pending.clear()
                    batch = list(self._active)
                    held = self._passes_left == 0 and not self._stopping
                    if self._passes_left and not self._stopping:
                        self._passes_left -= 1
                for seq in batch:
                    if seq.aborted.is_set():
                        self._finish(seq, GenerationOutput("", [], finish_reason="abort",
                                                           num_prompt_tokens=len(seq.prompt_ids)))
                        continue
                    if held:
                        continue
                    try:
                        out = self._step(seq)
                    # A model error fails this request only; the engine keeps serving.
                    except Exception as exc:  # noqa: BLE001
                        logger.exception("request %s failed in the CPU engine", seq.request_id)
                        self._finish(seq, exc)
                        continue
                    if out.finished:
                        self._finish(seq, out)
                    else:
                        self._deliver(seq, out)

    def _deliver(self, seq: _Sequence, item: GenerationOutput | BaseException) -> None:
        try:
            seq.loop.call_soon_threadsafe(seq.queue.put_nowait, item)
        except RuntimeError:
            # The request's event loop is closed: nobody is listening any more.
            seq.aborted.set()

    def _finish(self, seq: _Sequence, item: GenerationOutput | BaseException) -> None:
        with self._cond:
            if seq in self._active:
                self._active.remove(seq)
            self._by_id.pop(seq.request_id, None)
            seq.cache = None
            # Wakes `wait_in_flight` callers.
            self._cond.notify_all()
        self._deliver(seq, item)

    def _forward(self, seq: _Sequence, all_logits: bool) -> torch.Tensor:
        """Run the model for the next position; returns logits (L, V) float32 (L = 1 unless all_logits)."""
        if not seq.started:
            ids = torch.tensor([seq.prompt_ids], dtype=torch.long)
        elif self._use_kv_cache:
            ids = torch.tensor([[seq.output_ids[-1]]], dtype=torch.long)
        else:
            ids = torch.tensor([seq.prompt_ids + seq.output_ids], dtype=torch.long)
        kwargs: dict[str, Any] = {"use_cache": self._use_kv_cache}
        if self._use_kv_cache and seq.started:
            kwargs["past_key_values"] = seq.cache
        if not all_logits:
            kwargs["logits_to_keep"] = 1
        out = self._model(input_ids=ids, **kwargs)
        if self._use_kv_cache:
            seq.cache = out.past_key_values
        seq.started = True
        return out.logits[0].float()

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def _logprob_entry(self, logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
        """logprobs (V,) float32 -> the entry of `token_id` with its top-k alternatives."""
        top: list[tuple[int, str, float]] = []
        if k > 0:
            vals, idx = torch.topk(logprobs, min(k, logprobs.shape[0]))
            top = [(int(i), self._text_of(int(i)), float(v)) for v, i in zip(vals, idx)]
        return TokenLogprob(token_id, self._text_of(token_id), float(logprobs[token_id]), top)

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> int:
        """logits (V,) float32 -> the next token id."""
        opts = seq.options
        if (opts.presence_penalty or opts.frequency_penalty) and seq.output_ids:
            counts = torch.bincount(torch.tensor(seq.output_ids), minlength=logits.shape[0])[: logits.shape[0]]
            logits = logits - opts.frequency_penalty * counts - opts.presence_penalty * (counts > 0).float()
        if opts.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / max(opts.temperature, _MIN_TEMPERATURE), dim=-1)
        if opts.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always the first token).
            keep = (torch.cumsum(sorted_p, 0) - sorted_p) < opts.top_p
            # top_p below float32's smallest value (5e-324) compares as 0: the top token stays anyway.
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _decode_output(self, seq: _Sequence) -> str:
        ctx = seq.prompt_ids[-_DECODE_CONTEXT:]
        kw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        base = self._tokenizer.decode(ctx, **kw)
        full = self._tokenizer.decode(ctx + seq.output_ids, **kw)
        if full.startswith(base):
            return full[len(base):]
        return self._tokenizer.decode(seq.output_ids, **kw)

    def _step(self, seq: _Sequence) -> GenerationOutput:
        """Advance one sequence by one token; the output carries what is safe to send."""
        opts = seq.options
        first = not seq.started
        logits = self._forward(seq, all_logits=first and opts.prompt_logprobs is not None)
        prompt_lps: list[TokenLogprob | None] | None = None
        if first and opts.prompt_logprobs is not None:
            lp_all = torch.log_softmax(logits[:-1], dim=-1)
            prompt_lps = [None] + [self._logprob_entry(lp_all[i], seq.prompt_ids[i + 1], opts.prompt_logprobs)
                                   for i in range(len(seq.prompt_ids) - 1)]
        last = logits[-1]
        token = self._sample(seq, last)
        seq.output_ids.append(token)
        self.num_generated_tokens += 1
        token_lps = None
        if opts.logprobs is not None:
            token_lps = [self._logprob_entry(torch.log_softmax(last, dim=-1), token, opts.logprobs)]

        finish: str | None = None
        stop_reason: str | None = None
        if token in self._eos_ids and not opts.ignore_eos:
            finish = "stop"
        elif (len(seq.output_ids) >= opts.max_tokens
              or len(seq.prompt_ids) + len(seq.output_ids) >= self._max_model_len):
            finish = "length"
        text = self._decode_output(seq)
        if opts.stop:
            # Only text not searched before can hold a new match (plus a stop's length of overlap).
            start = max(0, seq.searched_chars - max(len(s) for s in opts.stop) + 1)
            hits = [(pos, s) for s in opts.stop if (pos := text.find(s, start)) >= 0]
            if hits:
                pos, stop_reason = min(hits)
                text = text[:pos]
                finish = "stop"
        seq.searched_chars = len(text)
        if finish is None:
            # Hold back an incomplete UTF-8 character and anything that may begin a stop string.
            safe = len(text)
            while safe > 0 and text[safe - 1] == _REPLACEMENT:
                safe -= 1
            if opts.stop:
                safe = min(safe, len(text) - (max(len(s) for s in opts.stop) - 1))
        else:
            safe = len(text)
        delta = text[seq.sent_chars:safe] if safe > seq.sent_chars else ""
        seq.sent_chars = max(seq.sent_chars, safe)
        return GenerationOutput(delta, [token], token_lps, finish, stop_reason,
                                num_prompt_tokens=len(seq.prompt_ids), prompt_logprobs=prompt_lps)
