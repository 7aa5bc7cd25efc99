"""The vLLM engine: vLLM 0.26's public `AsyncLLM` behind the `Engine` interface.

The SpinQuant plugin (`spinquant_vllm`, entry point ``vllm.general_plugins``) is loaded
by vLLM itself in every process; a checkpoint whose config.json carries
``quantization_config.quant_method == "spinquant"`` is served with
``quantization="spinquant"``. Everything vLLM-specific lives in this module and is
imported lazily, so the server imports (and its CPU engine runs) without vLLM.

Translation, unit-tested without a GPU: `to_sampling_params` (our `SamplingOptions`
-> vLLM `SamplingParams`, DELTA outputs) and `convert_output` (vLLM `RequestOutput`
delta -> our `GenerationOutput`).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from spinquant_server.engine import (QUANT_METHOD, CheckpointInfo, Engine, GenerationOutput, SamplingOptions,
                                     TokenLogprob, read_checkpoint_info)

logger = logging.getLogger(__name__)


def build_engine_args(model_path: str, extra_args: Sequence[str] = (), *,
                      served_model_name: str | None = None, **overrides: Any) -> Any:
    """vLLM `AsyncEngineArgs` for a checkpoint.

    Args:
        model_path: the checkpoint directory.
        extra_args: vLLM engine flags as on ``vllm serve`` (``["--gpu-memory-utilization",
            "0.9", "--enforce-eager"]``), parsed by vLLM's own parser (which needs a vLLM
            platform, i.e. a GPU); unknown flags make argparse exit naming them.
        served_model_name: the name clients use.
        overrides: AsyncEngineArgs fields set after parsing (None values are skipped).

    A SpinQuant checkpoint gets ``quantization="spinquant"`` unless a flag chose another.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    if extra_args:
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="spinquant serve --engine vllm"))
        args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model_path, *extra_args]))
    else:
        args = AsyncEngineArgs(model=model_path)
    info = read_checkpoint_info(model_path)
    if info.is_spinquant and args.quantization is None:
        args.quantization = QUANT_METHOD
    if served_model_name is not None:
        args.served_model_name = served_model_name
    for key, value in overrides.items():
        if value is not None:
            if not hasattr(args, key):
                raise ValueError(f"AsyncEngineArgs has no field {key!r}")
            setattr(args, key, value)
    return args


def to_sampling_params(options: SamplingOptions) -> Any:
    """Our `SamplingOptions` -> vLLM `SamplingParams` for one sequence, streamed as deltas."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        n=1,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        seed=options.seed,
        stop=list(options.stop),
        logprobs=options.logprobs,
        prompt_logprobs=options.prompt_logprobs,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        ignore_eos=options.ignore_eos,
        skip_special_tokens=True,
        include_stop_str_in_output=False,
        output_kind=RequestOutputKind.DELTA,
    )


def _position(entry: dict[int, Any] | None, token_id: int, k: int, decode: Any) -> TokenLogprob | None:
    """One vLLM logprob position ({token_id: Logprob(logprob, rank, decoded_token)}) -> TokenLogprob."""
    if entry is None:
        return None

    def text(tid: int, lp: Any) -> str:
        return lp.decoded_token if lp.decoded_token is not None else decode(tid)

    chosen = entry.get(token_id)
    ranked = sorted(((lp.rank if lp.rank is not None else 1 << 30, tid, lp) for tid, lp in entry.items()),
                    key=lambda r: (r[0], -r[2].logprob))
    top = [(tid, text(tid, lp), float(lp.logprob)) for rank, tid, lp in ranked if rank <= k][:k]
    if chosen is None:
        # Not expected from vLLM (the sampled token is always included); keep the shape.
        return TokenLogprob(token_id, decode(token_id), float("-inf"), top)
    return TokenLogprob(token_id, text(token_id, chosen), float(chosen.logprob), top)


def convert_output(output: Any, options: SamplingOptions, decode: Any, first: bool) -> GenerationOutput:
    """A vLLM `RequestOutput` in DELTA mode (one sequence) -> our `GenerationOutput`.

    Args:
        output: the RequestOutput; ``outputs[0]`` holds this step's new text / tokens / logprobs.
        options: the request's options (how many alternatives were asked for).
        decode: token id -> text, for logprob entries vLLM left undecoded.
        first: whether this is the sequence's first output (prompt logprobs ride on it).
    """
    comp = output.outputs[0] if output.outputs else None
    token_ids = list(comp.token_ids) if comp is not None else []
    logprobs = None
    if options.logprobs is not None and comp is not None and comp.logprobs is not None:
        entries = list(comp.logprobs)
        logprobs = [_position(e, t, options.logprobs, decode) for e, t in zip(entries, token_ids)]
    prompt_lps = None
    if first and options.prompt_logprobs is not None and output.prompt_logprobs is not None:
        ids = list(output.prompt_token_ids or [])
        prompt_lps = [None if i == 0 else _position(e, ids[i], options.prompt_logprobs, decode)
                      for i, e in enumerate(list(output.prompt_logprobs))]
    finish = comp.finish_reason if comp is not None else None
    if output.finished and finish is None:
        finish = "abort"
    elif finish is not None and finish not in ("stop", "length", "abort"):
        # vLLM also reports e.g. "error"; clients know only OpenAI's reasons.
        finish = "abort"
    return GenerationOutput(
        text=comp.text if comp is not None else "",
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=finish,
        stop_reason=comp.stop_reason if comp is not None else None,
        num_prompt_tokens=len(output.prompt_token_ids or []),
        prompt_logprobs=prompt_lps,
    )


class VLLMEngine(Engine):
    """vLLM `AsyncLLM` (in-process client, engine core in its own process).

    Args:
        engine_args: from `build_engine_args`.
    The engine is built in `start()` (on the server's event loop).
    """

    kind = "vllm"

    def __init__(self, engine_args: Any) -> None:
        self._args = engine_args
        self._info: CheckpointInfo = read_checkpoint_info(engine_args.model)
        self._llm: Any = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._vocab_size = 0
        self._in_flight = 0
        self._token_text: dict[int, str] = {}

    def _require(self) -> Any:
        if self._llm is None:
            raise RuntimeError("vLLM engine is not started (call start() first)")
        return self._llm

    async def start(self) -> None:
        if self._llm is not None:
            return
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM picks scheduler defaults by usage context. `vllm serve` builds its engine as
        # OPENAI_API_SERVER (on an H100: max_num_batched_tokens 8192, max_num_seqs 1024);
        # AsyncLLM's own default, ENGINE_CONTEXT, falls back to 2048 / 128. The H100 run that
        # had the latter (benchmarks/results/serving/server_overhead_llama8b.log) served 11%
        # fewer output tok/s than `vllm serve` on the same checkpoint and workload.
        self._llm = AsyncLLM.from_engine_args(self._args, usage_context=UsageContext.OPENAI_API_SERVER)
        self._tokenizer = self._llm.get_tokenizer()
        self._max_model_len = int(self._llm.model_config.max_model_len)
        self._vocab_size = int(self._llm.model_config.get_vocab_size())

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def check_health(self) -> None:
        await self._require().check_health()

    @property
    def tokenizer(self) -> Any:
        self._require()
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        self._require()
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        self._require()
        return self._vocab_size

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def model_info(self) -> dict[str, Any]:
        a = self._args
        return {"path": a.model, "architecture": (self._info.config.get("architectures") or ["?"])[0],
                "dtype": str(a.dtype), "quantization": a.quantization, "kv_cache_dtype": str(a.kv_cache_dtype),
                "tensor_parallel_size": a.tensor_parallel_size, "max_model_len": self._max_model_len or None,
                "vocab_size": self._vocab_size or None}

    def quantization_config(self) -> dict[str, Any] | None:
        return self._info.quantization_config

    def checkpoint_meta(self) -> dict[str, Any] | None:
        return self._info.meta

    def _decode(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    async def generate(self, prompt_token_ids: list[int], options: SamplingOptions,
                       request_id: str) -> AsyncIterator[GenerationOutput]:
        from vllm.inputs import TokensPrompt

        llm = self._require()
        params = to_sampling_params(options)
        self._in_flight += 1
        first = True
        try:
            # AsyncLLM.generate aborts the request itself when this iterator is cancelled or closed.
            async for out in llm.generate(TokensPrompt(prompt_token_ids=list(prompt_token_ids)), params,
                                          request_id):
                yield convert_output(out, options, self._decode, first)
                first = False
        finally:
            self._in_flight -= 1

    async def abort(self, request_id: str) -> None:
        await self._require().abort(request_id)
