"""benchmarks/gpu/stage.py: files cut into trips here arrive whole on the device."""
import importlib.util
import json
import os

import pytest


def _stage():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu", "stage.py")
    spec = importlib.util.spec_from_file_location("gpu_stage", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def files(tmp_path):
    """Member name -> path: sizes below, at and above one trip of 100 bytes, and an empty file."""
    src = tmp_path / "src"
    src.mkdir()
    out = {}
    for name, size in (("bundle/big.tar", 257), ("bundle/MANIFEST", 100), ("wheels/a.whl", 31), ("empty", 0)):
        p = src / name.replace("/", "_")
        p.write_bytes(bytes((i * 7 + size) % 256 for i in range(size)))
        out[name] = str(p)
    return out


def test_trips_hold_at_most_their_size_and_are_the_fewest(files):
    st = _stage()
    trips = st.plan_trips(files, 100)
    total = sum(os.path.getsize(p) for p in files.values())
    assert len(trips) == -(-total // 100) == 4
    assert all(sum(length for *_, length in t) <= 100 for t in trips)
    for member, path in files.items():  # every byte of every file in exactly one piece, in order
        pieces = sorted((i, off, n) for t in trips for m, i, off, n in t if m == member)
        assert [i for i, _, _ in pieces] == list(range(len(pieces)))
        assert sum(n for *_, n in pieces) == os.path.getsize(path)
        assert all(a[1] + a[2] == b[1] for a, b in zip(pieces, pieces[1:]))
    with pytest.raises(ValueError, match="trip size"):
        st.plan_trips(files, 0)


def test_unpack_joins_each_file_once_all_its_pieces_arrived(files, tmp_path):
    st = _stage()
    carry, stage = tmp_path / "carry", tmp_path / "stage"
    folders = st.write_trips(files, str(carry), "vllm", 100)
    assert [os.path.basename(f) for f in folders] == ["vllm-1", "vllm-2", "vllm-3", "vllm-4"]
    for f in folders:
        assert sum(os.path.getsize(os.path.join(f, n)) for n in os.listdir(f) if n != st.MANIFEST) <= 100
    # trips in any order; a file is complete only when its last piece has come
    first = st.unpack(folders[2], str(stage))
    assert "bundle/big.tar" in first["missing"]
    for f in (folders[3], folders[0]):
        st.unpack(f, str(stage))
    last = st.unpack(folders[1], str(stage))
    assert last == {"complete": sorted(files), "missing": []}
    for member, path in files.items():
        with open(path, "rb") as a, open(stage / member, "rb") as b:
            assert a.read() == b.read()
    assert os.listdir(stage / "pieces") == []
    assert st.unpack(folders[0], str(stage))["complete"] == sorted(files)  # a trip carried again
    # packing the group again removes its earlier trips
    assert st.write_trips({"empty": files["empty"]}, str(carry), "vllm", 100) == [str(carry / "vllm-1")]
    assert sorted(os.listdir(carry)) == ["vllm-1"]


def test_a_corrupt_piece_is_refused(files, tmp_path):
    st = _stage()
    (folder,) = st.write_trips({"wheels/a.whl": files["wheels/a.whl"]}, str(tmp_path / "carry"), "data", 100)
    piece = os.path.join(folder, st.piece_name("wheels/a.whl", 0))
    with open(piece, "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(ValueError, match="sha256 of the joined pieces"):
        st.unpack(folder, str(tmp_path / "stage"))
    assert not (tmp_path / "stage" / "wheels" / "a.whl").exists()
    manifest = json.loads(open(os.path.join(folder, st.MANIFEST)).read())
    assert manifest["files"]["wheels/a.whl"]["pieces"] == [[0, "data-1", 31]]


def test_the_vllm_group_needs_a_built_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-vllm-bundle.sh"):
        _stage().bundle_files(str(tmp_path))
