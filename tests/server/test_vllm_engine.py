"""The vLLM engine's translation layer, without a GPU (the served engine is tested in test_cli.py on GPU)."""
from __future__ import annotations

import json
import math

import pytest

from spinquant_server.engine import SamplingOptions

vllm = pytest.importorskip("vllm")


def test_sampling_params_translation():
    from vllm.sampling_params import RequestOutputKind

    from spinquant_server.vllm_engine import to_sampling_params

    opts = SamplingOptions(max_tokens=7, temperature=0.5, top_p=0.9, seed=42, stop=("\n\n", "END"), logprobs=3,
                           prompt_logprobs=1, presence_penalty=0.5, frequency_penalty=-0.25, ignore_eos=True)
    sp = to_sampling_params(opts)
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.seed) == (1, 7, 0.5, 0.9, 42)
    assert sp.stop == ["\n\n", "END"] and not sp.include_stop_str_in_output
    assert (sp.logprobs, sp.prompt_logprobs) == (3, 1)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.ignore_eos) == (0.5, -0.25, True)
    assert sp.output_kind == RequestOutputKind.DELTA and sp.skip_special_tokens
    greedy = to_sampling_params(SamplingOptions(max_tokens=1, temperature=0.0))
    assert greedy.temperature == 0.0 and greedy.seed is None and greedy.stop == []


def _request_output(**kw):
    from vllm.outputs import CompletionOutput, RequestOutput

    comp = CompletionOutput(index=0, text=kw.get("text", ""), token_ids=kw.get("token_ids", []),
                            cumulative_logprob=None, logprobs=kw.get("logprobs"),
                            finish_reason=kw.get("finish_reason"), stop_reason=kw.get("stop_reason"))
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=kw.get("prompt_ids", [5, 6, 7]),
                         prompt_logprobs=kw.get("prompt_logprobs"), outputs=[comp],
                         finished=kw.get("finished", False))


def test_output_conversion():
    from vllm.logprobs import Logprob

    from spinquant_server.vllm_engine import convert_output

    decode = {1: "a", 2: "b", 3: "c", 6: "six", 7: "seven", 9: "nine"}.__getitem__
    opts = SamplingOptions(max_tokens=4, logprobs=2, prompt_logprobs=1)
    # The sampled token (3) is ranked 3rd: it is reported, and top holds ranks 1 and 2 only.
    step = [{3: Logprob(-2.0, rank=3, decoded_token="c"), 1: Logprob(-0.5, rank=1, decoded_token="a"),
             2: Logprob(-1.0, rank=2, decoded_token=None)}]
    plp = [None, {6: Logprob(-1.5, rank=2, decoded_token="six"), 9: Logprob(-0.1, rank=1, decoded_token="nine")},
           {7: Logprob(-0.7, rank=1, decoded_token="seven")}]
    out = convert_output(_request_output(text="c", token_ids=[3], logprobs=step, prompt_logprobs=plp),
                         opts, decode, first=True)
    assert (out.text, out.token_ids, out.finish_reason, out.num_prompt_tokens) == ("c", [3], None, 3)
    (e,) = out.logprobs
    assert (e.token_id, e.token, e.logprob) == (3, "c", -2.0)
    assert e.top == [(1, "a", -0.5), (2, "b", -1.0)]
    assert out.prompt_logprobs[0] is None
    assert (out.prompt_logprobs[1].token_id, out.prompt_logprobs[1].logprob) == (6, -1.5)
    assert out.prompt_logprobs[1].top == [(9, "nine", -0.1)]
    assert out.prompt_logprobs[2].top == [(7, "seven", -0.7)]
    # Later outputs carry no prompt logprobs; finish and stop reasons pass through.
    last = convert_output(_request_output(text="", token_ids=[1], finished=True, finish_reason="stop",
                                          stop_reason="END", logprobs=[{1: Logprob(-0.5, 1, "a")}],
                                          prompt_logprobs=plp), opts, decode, first=False)
    assert last.finished and last.finish_reason == "stop" and last.stop_reason == "END"
    assert last.prompt_logprobs is None and last.logprobs[0].logprob == -0.5
    # A finished output without a reason, or with one clients do not know, is an abort.
    odd = convert_output(_request_output(finished=True, finish_reason="error"), opts, decode, first=False)
    assert odd.finish_reason == "abort"
    none = convert_output(_request_output(text="x", token_ids=[2]), SamplingOptions(max_tokens=1), decode, True)
    assert none.logprobs is None and none.prompt_logprobs is None
    assert not math.isnan(e.logprob)


def test_engine_args(tmp_path):
    from spinquant_server.vllm_engine import VLLMEngine, build_engine_args

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    args = build_engine_args(str(plain), served_model_name="m", max_model_len=64, enforce_eager=True,
                             gpu_memory_utilization=None)
    assert (args.model, args.quantization, args.served_model_name) == (str(plain), None, "m")
    assert (args.max_model_len, args.enforce_eager) == (64, True)
    assert 0 < args.gpu_memory_utilization <= 1  # None overrides keep vLLM's default

    quant = tmp_path / "quant"
    quant.mkdir()
    qcfg = {"quant_method": "spinquant", "w_bits": 4}
    (quant / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   "quantization_config": qcfg}))
    args = build_engine_args(str(quant))
    assert args.quantization == "spinquant"
    engine = VLLMEngine(args)
    assert engine.quantization_config() == qcfg and engine.num_in_flight == 0
    assert engine.model_info()["quantization"] == "spinquant"
    with pytest.raises(ValueError, match="no field"):
        build_engine_args(str(plain), not_a_field=1)
    with pytest.raises(RuntimeError, match="not started"):
        _ = engine.tokenizer


def test_engine_starts_with_vllm_serves_usage_context(tmp_path, monkeypatch):
    """Scheduler defaults follow the usage context: ours must be `vllm serve`'s, not AsyncLLM's own."""
    import asyncio

    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from spinquant_server.vllm_engine import VLLMEngine, build_engine_args

    seen = {}

    class FakeLLM:
        model_config = type("MC", (), {"max_model_len": 64, "get_vocab_size": lambda self: 100})()

        def get_tokenizer(self):
            return "tok"

    def fake_from_engine_args(engine_args, **kw):
        seen.update(kw, engine_args=engine_args)
        return FakeLLM()

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(fake_from_engine_args))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    engine = VLLMEngine(build_engine_args(str(tmp_path)))
    asyncio.run(engine.start())
    assert seen["usage_context"] == UsageContext.OPENAI_API_SERVER
    assert (engine.max_model_len, engine.vocab_size, engine.tokenizer) == (64, 100, "tok")
