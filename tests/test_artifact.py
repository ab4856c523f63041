"""Artifacts: round trip in a new process, hash checks, atomic writes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import llmcc
from helpers import ROOT, tiny_feed
from llmcc import artifact
from llmcc.errors import ArtifactError


def test_manifest_holds_versions_target_signature_hashes(tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    assert m["versions"]["llmcc"] == llmcc.__version__ and m["versions"]["tvm"]
    assert m["target"]["name"] == "cpu"
    assert m["inputs"][1] == {"name": "mask", "dtype": "float32", "shape": ["batch", "sequence"]}
    assert m["library"]["sha256"] == artifact.sha256_file(tiny_artifact / "model.so")
    assert m["weights"]["sha256"] == artifact.sha256_file(tiny_artifact / "weights.bin")
    assert [t["shape"] for t in m["weights"]["tensors"]] == [[50, 16], [16, 16]]
    assert m["report"]["verify"]["passed"] is True


def test_round_trip_in_a_new_process(tiny_artifact, tiny_module, tmp_path):
    feed = tiny_feed(np.random.default_rng(), 2, 11)
    np.savez(tmp_path / "feed.npz", **feed)
    script = (
        "import sys, numpy as np, llmcc\n"
        "m = llmcc.load(sys.argv[1]); f = dict(np.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], m(**f))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tiny_artifact), str(tmp_path / "feed.npz"),
                    str(tmp_path / "out.npy")], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), tiny_module(**feed))


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    dest = tmp_path / "copy.llmcc"
    shutil.copytree(tiny_artifact, dest)
    return dest


def test_changed_library_is_refused(artifact_copy):
    lib = artifact_copy / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.so: sha256 does not match"):
        llmcc.load(artifact_copy)


def test_truncated_weights_are_refused(artifact_copy):
    w = artifact_copy / "weights.bin"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="weights.bin: 100 bytes, the manifest says"):
        llmcc.load(artifact_copy)


def test_truncated_manifest_is_refused(artifact_copy):
    mf = artifact_copy / "manifest.json"
    mf.write_text(mf.read_text()[:50])
    with pytest.raises(ArtifactError, match="unreadable or truncated"):
        llmcc.load(artifact_copy)


def test_artifact_for_a_cpu_with_more_features_is_refused(artifact_copy, monkeypatch):
    """Built where the CPU has AVX2 (or AVX-512, VNNI), loaded where it has not: a clear error naming the features,
    not an illegal instruction at the first call. Must not fire: the same CPU, or one with more features."""
    import dataclasses

    from llmcc import targets

    host = targets.host_cpu()
    built_for = set(json.loads((artifact_copy / "manifest.json").read_text())["target"]["features"])
    assert llmcc.load(artifact_copy).target.features == host.features
    monkeypatch.setattr(targets, "host_cpu", lambda: dataclasses.replace(host, features=host.features + ("amx",)))
    llmcc.load(artifact_copy)
    lacking = dataclasses.replace(host, features=tuple(f for f in host.features if f not in ("avx2", "avx512f")))
    monkeypatch.setattr(targets, "host_cpu", lambda: lacking)
    if built_for & {"avx2", "avx512f"}:
        with pytest.raises(ArtifactError, match=r"copy\.llmcc: built for a CPU with avx2.*which this CPU lacks"):
            llmcc.load(artifact_copy)


def test_missing_and_foreign_paths(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        llmcc.load(tmp_path / "nope.llmcc")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ArtifactError, match="not an llmcc artifact"):
        llmcc.load(tmp_path / "dir")


def test_save_over_an_existing_artifact_replaces_it_whole(tiny_module, artifact_copy):
    (artifact_copy / "stale").write_text("x")
    tiny_module.save(artifact_copy)
    assert not (artifact_copy / "stale").exists()
    assert llmcc.load(artifact_copy).report["target"] == "cpu"
    assert [p.name for p in artifact_copy.parent.iterdir() if p.name.startswith(".")] == []


def test_save_refuses_to_overwrite_a_non_artifact_folder(tiny_module, tmp_path):
    victim = tmp_path / "mydata"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="is not an llmcc artifact; refusing"):
        tiny_module.save(victim)
    assert (victim / "keep.txt").read_text() == "precious"


def test_failed_save_leaves_nothing_behind(tiny_module, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(artifact, "write_weights", boom)
    with pytest.raises(OSError):
        tiny_module.save(tmp_path / "x.llmcc")
    assert list(tmp_path.iterdir()) == []
