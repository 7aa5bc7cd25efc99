"""The CPU reference engine on its own (no HTTP): sampling, stop strings, logprobs, abort."""
from __future__ import annotations

import asyncio
import json
import sys
import types

import pytest
import torch

from spinquant_server.cpu_engine import CPUEngine
from spinquant_server.engine import SamplingOptions


def run(coro):
    return asyncio.run(coro)


async def _generate(engine, ids, opts, rid="r"):
    outs = [o async for o in engine.generate(ids, opts, rid)]
    return outs


async def _with_engine(engine, fn):
    await engine.start()
    try:
        return await fn()
    finally:
        await engine.shutdown()


def _collect(outs):
    return "".join(o.text for o in outs), [t for o in outs for t in o.token_ids]


def test_greedy_matches_hf_generate(make_engine, tiny_model):
    model, tok = tiny_model
    prompt = tok.encode("The quick brown fox")
    opts = SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True)
    for kv_cache in (True, False):
        engine = make_engine(use_kv_cache=kv_cache)
        outs = run(_with_engine(engine, lambda: _generate(engine, prompt, opts)))
        text, ids = _collect(outs)
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ids == ref, f"kv_cache={kv_cache}"
        assert outs[-1].finish_reason == "length"
        assert text == tok.decode(ref, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_seed_reproducible_and_top_p_tiny_is_greedy(make_engine, tiny_model):
    _, tok = tiny_model
    prompt = tok.encode("Hello world")
    engine = make_engine()

    async def body():
        a = await _generate(engine, prompt, SamplingOptions(max_tokens=20, seed=7, ignore_eos=True), "a")
        b = await _generate(engine, prompt, SamplingOptions(max_tokens=20, seed=7, ignore_eos=True), "b")
        c = await _generate(engine, prompt, SamplingOptions(max_tokens=20, seed=8, ignore_eos=True), "c")
        g = await _generate(engine, prompt, SamplingOptions(max_tokens=20, temperature=0, ignore_eos=True), "g")
        p = await _generate(engine, prompt, SamplingOptions(max_tokens=20, top_p=1e-6, seed=3, ignore_eos=True), "p")
        return a, b, c, g, p
    a, b, c, g, p = run(_with_engine(engine, body))
    assert _collect(a)[1] == _collect(b)[1]
    assert _collect(a)[1] != _collect(c)[1]
    assert _collect(p)[1] == _collect(g)[1]


def test_stop_string_truncates_and_is_held_back(make_engine, tiny_model):
    _, tok = tiny_model
    prompt = tok.encode("Numbers 0 1 2")
    engine = make_engine()
    greedy = SamplingOptions(max_tokens=40, temperature=0, ignore_eos=True)

    async def body():
        full, _ = _collect(await _generate(engine, prompt, greedy, "full"))
        # A stop string from the middle of the greedy text (not at position 0).
        visible = [i for i in range(3, len(full) - 3) if "\ufffd" not in full[i:i + 3]]
        assert visible, f"greedy text has no clean 3-char window: {full!r}"
        i = visible[len(visible) // 2]
        stop = full[i:i + 3]
        first = full.find(stop)
        outs = await _generate(engine, prompt, SamplingOptions(max_tokens=40, temperature=0, ignore_eos=True,
                                                               stop=(stop,)), "stop")
        return full, stop, first, outs
    full, stop, first, outs = run(_with_engine(engine, body))
    text, _ = _collect(outs)
    assert text == full[:first]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    # No delta ever contained part of the stop string beyond what the final text keeps.
    assert all(stop not in o.text for o in outs)


def test_logprobs_match_model(make_engine, tiny_model):
    model, tok = tiny_model
    prompt = tok.encode("Rotations spread")
    engine = make_engine()
    opts = SamplingOptions(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    outs = run(_with_engine(engine, lambda: _generate(engine, prompt, opts)))
    _, ids = _collect(outs)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    lps = [e for o in outs for e in (o.logprobs or [])]
    assert len(lps) == len(ids)
    for j, e in enumerate(lps):
        pos = len(prompt) - 1 + j
        assert e.token_id == ids[j]
        assert e.logprob == pytest.approx(float(ref[pos, ids[j]]), abs=1e-4)
        assert [t for t, _, _ in e.top][0] == ids[j]  # greedy takes the top token
        assert len(e.top) == 3 and all(e.top[k][2] >= e.top[k + 1][2] for k in range(2))
    plp = outs[0].prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        assert plp[i].token_id == prompt[i]
        assert plp[i].logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        assert len(plp[i].top) == 2


def test_streamed_deltas_equal_one_shot_text(make_engine, tiny_model):
    _, tok = tiny_model
    prompt = tok.encode("Caf\u00e9")
    engine = make_engine()
    opts = SamplingOptions(max_tokens=60, seed=11, ignore_eos=True)
    outs = run(_with_engine(engine, lambda: _generate(engine, prompt, opts)))
    text, ids = _collect(outs)
    assert text == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert sum(len(o.token_ids) for o in outs) == 60 and outs[-1].finish_reason == "length"


def test_abort_and_cancel_leave_nothing_in_flight(make_engine, tiny_model):
    _, tok = tiny_model
    prompt = tok.encode("Hello")
    engine = make_engine()
    long = SamplingOptions(max_tokens=400, ignore_eos=True)

    async def idle() -> None:
        assert await asyncio.to_thread(engine.wait_in_flight, 0, 120), engine.num_in_flight

    async def body():
        # One pass, then held: the sequence has exactly one token (and a KV cache) when aborted.
        engine.hold(passes=1)
        gen = engine.generate(prompt, long, "ab")
        first = await gen.__anext__()
        assert len(first.token_ids) == 1 and not first.finished
        await engine.abort("ab")
        rest = [o async for o in gen]
        assert [(o.finish_reason, o.token_ids) for o in rest] == [("abort", [])]
        # Closing the iterator early (a client gone) drops the sequence as well.
        engine.hold(passes=1)
        gen2 = engine.generate(prompt, long, "cl")
        await gen2.__anext__()
        await gen2.aclose()
        await idle()
        # So does cancelling its consumer; held, the sequence cannot finish before the cancel.
        engine.hold()
        task = asyncio.ensure_future(_generate(engine, prompt, long, "ca"))
        while engine.num_in_flight == 0:
            await asyncio.sleep(0)  # yields to the task until the engine has admitted it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await idle()
        engine.release()
    run(_with_engine(engine, body))
    assert engine.num_generated_tokens == 2  # "ab" and "cl" one token each, "ca" none


def test_hold_refuses_negative_passes_and_shutdown_overrides_it(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="passes >= 0"):
        engine.hold(passes=-1)

    async def body():
        engine.hold()
        gen = engine.generate([1, 2, 3], SamplingOptions(max_tokens=8, ignore_eos=True), "held")
        task = asyncio.ensure_future(gen.__anext__())
        while engine.num_in_flight == 0:
            await asyncio.sleep(0)
        await engine.shutdown()  # would never return if the hold kept the worker waiting
        out = await task
        assert out.finish_reason == "abort" and engine.num_in_flight == 0
    run(_with_engine(engine, body))
    assert engine.num_generated_tokens == 0


def test_rejects_bad_prompts_and_options(make_engine):
    engine = make_engine(max_model_len=16)

    async def body():
        opts = SamplingOptions(max_tokens=4)
        for ids, what in [([], "at least one token"), (list(range(1, 17)), "max_model_len"),
                          ([10**6], "token ids")]:
            with pytest.raises(ValueError, match=what):
                await _generate(engine, ids, opts)
        running = engine.generate([1, 2], SamplingOptions(max_tokens=8), "dup")
        await running.__anext__()
        with pytest.raises(ValueError, match="already running"):
            await _generate(engine, [1, 2], opts, "dup")
        await running.aclose()
    run(_with_engine(engine, body))
    for bad in [dict(max_tokens=0), dict(max_tokens=1, temperature=-1), dict(max_tokens=1, top_p=0),
                dict(max_tokens=1, stop=("",)), dict(max_tokens=1, logprobs=-1)]:
        with pytest.raises(ValueError, match="SamplingOptions needs"):
            SamplingOptions(**bad)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_engine(max_model_len=10**6)


def test_spinquant_checkpoint_loads_through_offline(tmp_path, monkeypatch, tiny_model):
    """A config.json with quant_method spinquant goes to spinquant_offline.checkpoint.load_checkpoint."""
    model, tok = tiny_model
    qcfg = {"quant_method": "spinquant", "w_bits": 4, "a_bits": 4, "kv_bits": 4}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "quantization_config": qcfg}))
    (tmp_path / "spinquant_meta.json").write_text(json.dumps({"seed": 0}))
    calls = []

    def load_checkpoint(path, dtype=torch.float32):
        calls.append((path, dtype))
        return model, tok, object()
    fake = types.ModuleType("spinquant_offline.checkpoint")
    fake.load_checkpoint = load_checkpoint
    monkeypatch.setitem(sys.modules, "spinquant_offline.checkpoint", fake)
    engine = CPUEngine.from_checkpoint(str(tmp_path), num_threads=1)
    assert calls == [(str(tmp_path), torch.float32)]
    assert engine.quantization_config() == qcfg
    assert engine.checkpoint_meta() == {"seed": 0}
