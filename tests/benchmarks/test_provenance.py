"""benchmarks/provenance.py: result files are replaced whole or not at all."""
import json

import pytest

from spinquant_testutils import load_script


def test_write_text_replaces_whole_files_and_a_failure_keeps_the_old_one(tmp_path):
    prov = load_script("provenance")
    path = tmp_path / "summary.json"
    prov.write_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):  # fails inside the write: the previous file stays, no temp file
        prov.write_text(str(path), b"not text")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    with pytest.raises(TypeError):  # not serialisable: fails before anything is written
        prov.write_json(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    prov.write_json(str(path), {"b": 2}, indent=2)
    assert path.read_text() == '{\n  "b": 2\n}'
