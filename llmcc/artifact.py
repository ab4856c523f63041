"""The artifact: one folder the user passes around.

    model.llmcc/
      manifest.json   llmcc and TVM versions, target, signature, weight index, sha256 of every file, the report
      model.so        the compiled library (VM code and kernels; for CUDA the fatbin inside)
      weights.bin     the weights, 64-byte aligned, in parameter order

Written into a temporary folder beside the destination and renamed into place, so a crash never leaves a partial
artifact and an existing one is replaced only by a complete one. Reading checks every hash first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from llmcc.errors import ArtifactError

FORMAT = "llmcc-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "weights.bin"
_ALIGN = 64


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_weights(path: Path, weights: list[tuple[str, np.ndarray]]) -> list[dict]:
    """Write arrays back to back, each at a 64-byte aligned offset; return their index."""
    index, offset = [], 0
    with open(path, "wb") as f:
        for name, array in weights:
            array = np.ascontiguousarray(array)
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(array.tobytes())
            index.append({"name": name, "dtype": str(array.dtype), "shape": list(array.shape), "offset": offset,
                          "nbytes": int(array.nbytes)})
            offset += array.nbytes
    return index


def read_weights(path: Path, index: list[dict]) -> list[np.ndarray]:
    data = np.memmap(path, dtype=np.uint8, mode="r") if index else None
    arrays = []
    for entry in index:
        raw = data[entry["offset"]: entry["offset"] + entry["nbytes"]]
        arrays.append(np.frombuffer(raw, dtype=entry["dtype"]).reshape(entry["shape"]))
    return arrays


def write(dest: str | os.PathLike, library: Path, weights: list[tuple[str, np.ndarray]], manifest: dict) -> Path:
    """Write an artifact folder atomically at ``dest`` from a built library file and the weights."""
    dest = Path(dest)
    if dest.exists() and not (dest / MANIFEST).exists():
        raise ArtifactError(f"{dest}: exists and is not an llmcc artifact; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        shutil.copyfile(library, tmp / LIBRARY)
        index = write_weights(tmp / WEIGHTS, weights)
        manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
        manifest["library"] = {"file": LIBRARY, "sha256": sha256_file(tmp / LIBRARY),
                               "bytes": (tmp / LIBRARY).stat().st_size}
        manifest["weights"] = {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS),
                               "bytes": (tmp / WEIGHTS).stat().st_size, "tensors": index}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / "a")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact")
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path}: not an llmcc artifact (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{path / MANIFEST}: unreadable or truncated ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path / MANIFEST}: not an llmcc manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {manifest.get('format_version')}, this llmcc reads "
                            f"{FORMAT_VERSION}; recompile the model")
    return manifest


def check_files(path: Path, manifest: dict) -> None:
    """Refuse a changed, truncated or missing library or weight file."""
    for key in ("library", "weights"):
        entry = manifest[key]
        file = path / entry["file"]
        if not file.is_file():
            raise ArtifactError(f"{file}: missing from the artifact")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{file}: {size} bytes, the manifest says {entry['bytes']} (truncated or "
                                f"replaced); recompile the model")
        if sha256_file(file) != entry["sha256"]:
            raise ArtifactError(f"{file}: sha256 does not match the manifest (file changed); recompile the model")
