"""The engine interface the HTTP layer talks to, and the types crossing it.

Two implementations: `spinquant_server.cpu_engine.CPUEngine` (a transformers causal LM,
the SpinQuant fake-quant model, stepped in a worker thread) and
`spinquant_server.vllm_engine.VLLMEngine` (vLLM's public `AsyncLLM`). The HTTP layer
tokenizes, validates against `max_model_len` and builds `SamplingOptions`; an engine
turns one token-id prompt into a stream of `GenerationOutput` deltas for one sequence.
"""
from __future__ import annotations

import abc
import json
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

QUANT_METHOD = "spinquant"


@dataclass(frozen=True)
class SamplingOptions:
    """How one sequence is sampled (one choice of one prompt).

    Attributes:
        max_tokens: generated tokens at most (>= 1).
        temperature: 0 is greedy (argmax); otherwise logits / temperature, in (0, 2].
        top_p: nucleus mass in (0, 1]; 1 keeps every token.
        seed: seeds this sequence's own generator; None draws a seed from the engine.
        stop: stop strings; the output ends before the first occurrence (not included).
        logprobs: None: no logprobs; k >= 0: the sampled token's logprob plus the top k.
        prompt_logprobs: None or k >= 0: logprobs of the prompt tokens (first output only).
        presence_penalty, frequency_penalty: OpenAI penalties over the generated tokens.
        ignore_eos: keep generating after the end-of-sequence token.
    """
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens >= 1", self.max_tokens >= 1, self.max_tokens),
            ("0 <= temperature <= 2", math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0,
             self.temperature),
            ("0 < top_p <= 1", 0.0 < self.top_p <= 1.0, self.top_p),
            ("stop strings non-empty", all(isinstance(s, str) and s for s in self.stop), self.stop),
            ("logprobs None or >= 0", self.logprobs is None or self.logprobs >= 0, self.logprobs),
            ("prompt_logprobs None or >= 0", self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             self.prompt_logprobs),
            ("-2 <= presence_penalty <= 2", -2.0 <= self.presence_penalty <= 2.0, self.presence_penalty),
            ("-2 <= frequency_penalty <= 2", -2.0 <= self.frequency_penalty <= 2.0, self.frequency_penalty),
        ]
        for what, ok, seen in checks:
            if not ok:
                raise ValueError(f"SamplingOptions needs {what}, got {seen!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    """One position's logprob: the token at that position and the top alternatives.

    Attributes:
        token_id: the token taken at this position.
        token: its text (the token decoded alone).
        logprob: its log-probability under the model (raw logits, before temperature / top-p).
        top: up to k alternatives, best first, as (token_id, token text, logprob).
    """
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class GenerationOutput:
    """One incremental output of one sequence.

    Attributes:
        text: text new since the previous output (may be empty while bytes of a
            character or a possible stop string are held back).
        token_ids: tokens new since the previous output.
        logprobs: one entry per new token when logprobs were asked for, else None.
        finish_reason: None while running; "stop" (EOS or stop string), "length"
            (max_tokens or the context), "abort" (aborted or engine shut down).
        stop_reason: the stop string that ended the sequence, else None.
        num_prompt_tokens: tokens in the prompt.
        prompt_logprobs: on the first output when asked for: one entry per prompt token,
            None for the first token (nothing predicts it).
    """
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CheckpointInfo:
    """What a checkpoint directory says about itself (no weights read).

    Attributes:
        path: the directory (or GGUF file) as given.
        config: config.json as a dict ({} for a GGUF file).
        quantization_config: config.json's ``quantization_config`` when its
            ``quant_method`` is ``"spinquant"``, else None.
        meta: spinquant_meta.json (how the checkpoint was made), or None.
    """
    path: str
    config: dict[str, Any]
    quantization_config: dict[str, Any] | None
    meta: dict[str, Any] | None

    @property
    def is_spinquant(self) -> bool:
        return self.quantization_config is not None


def read_checkpoint_info(path: str) -> CheckpointInfo:
    """Read config.json / spinquant_meta.json of a checkpoint directory.

    Raises:
        FileNotFoundError: the path does not exist, or a directory has no config.json.
        ValueError: config.json is not a JSON object.
    """
    if os.path.isfile(path):
        return CheckpointInfo(path=path, config={}, quantization_config=None, meta=None)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path!r}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"checkpoint directory has no config.json: {path!r}")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
    qcfg = config.get("quantization_config")
    if not (isinstance(qcfg, dict) and qcfg.get("quant_method") == QUANT_METHOD):
        qcfg = None
    meta = None
    meta_path = os.path.join(path, "spinquant_meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    return CheckpointInfo(path=path, config=config, quantization_config=qcfg, meta=meta)


class Engine(abc.ABC):
    """A text-generation engine serving one model.

    Subclasses stream `GenerationOutput` deltas from `generate`; closing or cancelling
    the iterator, or `abort(request_id)`, stops the sequence inside the engine.
    """

    #: "cpu" or "vllm"
    kind: str = ""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (encode / decode / apply_chat_template)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Prompt plus generated tokens at most."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Token ids accepted in prompts are in [0, vocab_size)."""

    @property
    @abc.abstractmethod
    def num_in_flight(self) -> int:
        """Sequences inside the engine (queued or running); 0 when idle."""

    @abc.abstractmethod
    def model_info(self) -> dict[str, Any]:
        """Path, architecture and sizes of the served model (JSON-serialisable)."""

    @abc.abstractmethod
    def quantization_config(self) -> dict[str, Any] | None:
        """The checkpoint's SpinQuant ``quantization_config`` (None for an unquantized model)."""

    def checkpoint_meta(self) -> dict[str, Any] | None:
        """spinquant_meta.json of the checkpoint, when it has one."""
        return None

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[int], options: SamplingOptions,
                 request_id: str) -> AsyncIterator[GenerationOutput]:
        """Generate one sequence; yields deltas, the last one with a finish_reason.

        Raises:
            ValueError: the request cannot be served (duplicate request_id, prompt
                beyond the context, token id outside the vocabulary).
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running sequence; its iterator ends with finish_reason "abort". Unknown ids are ignored."""

    async def start(self) -> None:
        """Called once from the server's event loop before the first request."""

    async def shutdown(self) -> None:
        """Abort what is left and release the engine's threads / processes."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
