"""Evaluation: perplexity by hand, zero-shot scoring on toy tasks, kurtosis and its plot."""

import gzip
import json
import math

import pytest
import torch

from spinquant_kernels import format as fmt
from spinquant_kernels.hadamard import hadamard_transform_ref
from spinquant_offline import evaluate, fake_quant, rotation
from spinquant_offline.model import tiny_llama
from spinquant_testutils import byte_tokenizer




@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=257, dtype=torch.float64, seed=3)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# ----------------------------------------------------------------------------
# perplexity
# ----------------------------------------------------------------------------
def nll_by_hand(model, ids, seqlen, n):
    total = 0.0
    for w in range(n):
        x = ids[:, w * seqlen:(w + 1) * seqlen]
        logp = torch.log_softmax(model(x).logits[0].double(), -1)
        for p in range(seqlen - 1):
            total -= float(logp[p, x[0, p + 1]])
    return total


def test_perplexity_is_exp_of_mean_nll(model):
    seqlen, n = 16, 5
    ids = torch.randint(0, 257, (1, n * seqlen + 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = math.exp(nll_by_hand(model, ids, seqlen, n) / (n * (seqlen - 1)))
        want2 = math.exp(nll_by_hand(model, ids, seqlen, 2) / (2 * (seqlen - 1)))
    assert evaluate.perplexity(model, ids, seqlen=seqlen) == pytest.approx(want, rel=1e-12)
    assert evaluate.perplexity(model, ids, seqlen=seqlen, batch_size=3) == pytest.approx(want, rel=1e-12)
    assert evaluate.perplexity(model, ids, seqlen=seqlen, max_windows=2) == pytest.approx(want2, rel=1e-12)
    assert want != pytest.approx(want2, rel=1e-6)  # the cap really changes what is scored


def test_perplexity_bad_input(model):
    ids = torch.zeros((1, 10), dtype=torch.long)
    with pytest.raises(ValueError, match="no window"):
        evaluate.perplexity(model, ids, seqlen=16)
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        evaluate.perplexity(model, ids[0], seqlen=4)


# ----------------------------------------------------------------------------
# zero-shot
# ----------------------------------------------------------------------------
def ll_by_hand(model, tok, context, continuation):
    """The harness's rule: trailing context spaces are scored as part of the continuation."""
    stripped = context.rstrip(" ")
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    x = torch.tensor([whole])
    logp = torch.log_softmax(model(x).logits[0].double(), -1)
    return sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))


def test_loglikelihoods_batched_equal_one_by_one(model, tok):
    reqs = [("The cat sat on the", " mat"), ("Q: 2+2?\nA:", " 4"), ("A much longer context " * 3, " end."),
            ("x", " yz"), ("Question: why?\nAnswer:", " because it is so")]
    with torch.no_grad():
        want = [ll_by_hand(model, tok, c, k) for c, k in reqs]
    for budget in (1, 64, 10_000):
        got = evaluate.loglikelihoods(model, tok, reqs, batch_tokens=budget)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_loglikelihoods_encode_each_request_list_once(model, tok, monkeypatch):
    reqs = [("The cat sat on the", " mat"), ("Q: 2+2?\nA:", " 4")]
    calls = []
    real = evaluate.encode_pair
    monkeypatch.setattr(evaluate, "encode_pair", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(evaluate, "_ENCODED", {})
    first = evaluate.loglikelihoods(model, tok, reqs)
    assert len(calls) == 2
    assert evaluate.loglikelihoods(model, tok, reqs) == first and len(calls) == 2  # memoized
    evaluate.loglikelihoods(model, tok, reqs, max_length=4)  # other truncation: encoded again
    evaluate.loglikelihoods(model, tok, reqs[:1])  # other requests: encoded again
    assert len(calls) == 5


def test_trailing_context_space_moves_to_the_continuation(tok):
    ctx, cont = evaluate.encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    ctx, cont = evaluate.encode_pair(tok, "", "abc")
    assert ctx == [tok.eos_token_id] and tok.decode(cont) == "abc"


def test_long_requests_keep_their_last_tokens(model, tok):
    context, cont = "abcdefghij" * 4, " klm"
    got = evaluate.loglikelihoods(model, tok, [(context, cont)], max_length=12)[0]
    whole = tok(context + cont, add_special_tokens=False)["input_ids"][-13:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    want = sum(float(logp[p - 1, whole[p]]) for p in range(len(whole) - 4, len(whole)))
    assert got == pytest.approx(want, rel=1e-9)


def test_acc_and_acc_norm_on_a_toy_two_choice_task(model, tok):
    docs = [evaluate.Doc(["Sky is"] * 2, [" blue", " green"], 0),
            evaluate.Doc(["One plus one:", "One plus one:"], [" two", " three"], 1),
            evaluate.Doc(["Fire is"] * 2, [" hot", " cold and wet"], 0)]
    with torch.no_grad():
        lls = [[ll_by_hand(model, tok, c, k) for c, k in zip(d.contexts, d.continuations)] for d in docs]
    want_acc = sum(max(range(2), key=lambda j: ll[j]) == d.gold for ll, d in zip(lls, docs)) / 3
    want_norm = sum(max(range(2), key=lambda j: ll[j] / len(d.continuations[j][1:].encode()))
                    == d.gold for ll, d in zip(lls, docs)) / 3
    res = evaluate.score_docs(model, tok, docs)
    assert res == {"acc": want_acc, "acc_norm": want_norm, "n": 3}


def test_acc_norm_divides_by_bytes_not_characters(monkeypatch, model, tok):
    # " ééé": 3 characters, 6 bytes; " abcd": 4 characters, 4 bytes.
    # sums (-6, -5): acc picks 1; per byte (-1, -1.25) picks 0; per character (-2, -1.25) would pick 1.
    monkeypatch.setattr(evaluate, "loglikelihoods", lambda *a, **k: [-6.0, -5.0])
    res = evaluate.score_docs(model, tok, [evaluate.Doc(["q"] * 2, [" ééé", " abcd"], 0)])
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0
    assert evaluate.choice_bytes(" ééé") == 6 and evaluate.choice_bytes("ééé") == 6


def write_task(root, folder, docs, offset=1000000, num_instances=None):
    """Write an olmo_eval-style zero-shot request file, with unconditional requests too."""
    d = root / folder / "rc_0shot"
    d.mkdir(parents=True)
    rows = []
    for doc_id, (ctx, choices, gold) in enumerate(docs):
        for idx, ch in enumerate(choices):
            rows.append({"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx, "label": gold,
                         "request": {"context": ctx, "continuation": " " + ch}})
            rows.append({"request_type": "loglikelihood", "doc_id": doc_id + offset, "idx": idx,
                         "label": gold, "request": {"context": "Answer:", "continuation": " " + ch}})
    with gzip.open(d / "requests.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "config.json").write_text(json.dumps({
        "num_instances": num_instances or len(docs),
        "task_config": {"split": "validation", "metric_kwargs": {"uncond_docid_offset": offset}}}))


def test_zeroshot_reads_request_files_and_reports_missing_tasks(model, tok, tmp_path):
    docs = [("Sky is", ["blue", "green"], 0), ("Grass is", ["green", "blue"], 0),
            ("Snow is", ["black", "white"], 1)]
    write_task(tmp_path, "social_iqa", docs)  # found under an alias folder name
    res = evaluate.zeroshot(model, tok, tasks=("siqa", "boolq"), root=str(tmp_path))
    assert res["socialiqa"]["n"] == 3 and res["socialiqa"]["n_full"] == 3
    assert "missing" in res["boolq"] and "boolq" in res["missing"]
    assert res["average"]["tasks"] == ["socialiqa"]
    want = evaluate.score_docs(model, tok, [evaluate.Doc([c] * 2, [" " + x for x in ch], g) for c, ch, g in docs])
    assert res["socialiqa"]["acc"] == want["acc"] and res["average"]["acc_norm"] == want["acc_norm"]
    res = evaluate.zeroshot(model, tok, tasks=("social_iqa",), limit=2, root=str(tmp_path))
    assert res["socialiqa"]["n"] == 2
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        evaluate.zeroshot(model, tok, tasks=("mmlu",), root=str(tmp_path))


def test_bundled_tasks_are_the_full_validation_sets():
    for task in evaluate.EIGHT_TASKS:
        path = evaluate.task_file(task)
        assert path is not None, task
        docs, cfg = evaluate.load_task(path)
        assert cfg["task_config"]["split"] == "validation"
        assert len(docs) == cfg["num_instances"], task
        assert all(0 <= d.gold < len(d.continuations) for d in docs)
        assert not any(c == "Answer:" for d in docs for c in d.contexts), task  # no unconditional rows
    assert evaluate.canonical_task("SIQA") == "socialiqa"
    assert evaluate.canonical_task("arc-e") == "arc_easy"


# ----------------------------------------------------------------------------
# kurtosis
# ----------------------------------------------------------------------------
def pearson_kurtosis(x):
    x = x.double().flatten(0, -2)
    z = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
    return float(z.pow(4).mean(-1).mean())


def test_kurtosis_matches_a_direct_computation():
    m = tiny_llama(vocab=257, dtype=torch.float64, seed=1)
    rotation.fuse_norms(m)
    fake_quant.install(m, fmt.SpinQuantConfig(act_bits=16, kv_bits=16, r4_size=96))
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
                 lambda mod, a: seen.__setitem__("q", a[0])),
             m.model.layers[0].mlp.down_proj.register_forward_pre_hook(
                 lambda mod, a: seen.__setitem__("down", a[0]))]
    with torch.no_grad():
        m(ids)
    for h in hooks:
        h.remove()
    k = evaluate.kurtosis(m, ids, seqlen=40)
    assert set(k) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert all(len(v) == 2 for v in k.values())
    assert k["qkv_proj"][1] == pytest.approx(pearson_kurtosis(seen["q"]), rel=1e-9)
    # down_proj is measured after its online Hadamard, as the GEMM sees it
    assert k["down_proj"][0] == pytest.approx(pearson_kurtosis(hadamard_transform_ref(seen["down"], 96)), rel=1e-9)
    assert k["down_proj"][0] != pytest.approx(pearson_kurtosis(seen["down"]), rel=1e-3)


def test_rotation_lowers_the_kurtosis_of_an_outlier_channel(tmp_path):
    m = tiny_llama(vocab=257, dtype=torch.float64, seed=2)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 5] += 4.0  # a residual-stream outlier channel
    ids = torch.randint(0, 257, (1, 32), generator=torch.Generator().manual_seed(0))
    before = evaluate.kurtosis(m, ids, seqlen=32)
    rotation.fuse_norms(m)
    R1, R2s = rotation.init_rotations(m, "hadamard", torch.Generator().manual_seed(0))
    rotation.absorb_rotations(m, R1, R2s)
    after = evaluate.kurtosis(m, ids, seqlen=32)
    assert before["qkv_proj"][0] > 3 * after["qkv_proj"][0]
    png = evaluate.kurtosis_plot(before, after, str(tmp_path / "sub" / "kurtosis.png"), title="tiny")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to plot"):
        evaluate.kurtosis_plot({}, {}, str(tmp_path / "x.png"))
