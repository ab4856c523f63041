"""The tuning database folder: MetaSchedule's JSON records, readable while tuners append to it, never lost to a kill.

A folder holds shards, each a pair of files in MetaSchedule's JSON database format (one JSON list per line):

    database_workload.json                 one kernel workload per line: [structural hash, base64 IRModule]
    database_tuning_record.json            one measured schedule per line: [workload line, [trace, run_secs,
                                           target, args_info]]
    database_workload.<writer>.json        the same pair for one tuner process (``<writer>`` = host-pid-time),
    database_tuning_record.<writer>.json   appended and flushed record by record as candidates are measured

Why shards: MetaSchedule's record lines point at workload lines by number, so two processes appending to one pair
would corrupt each other's numbering. Each tuner appends to its own pair instead; reading merges every pair in the
folder (exact duplicates dropped). A kill loses at most the line being written: a truncated or corrupt line is
skipped with a warning naming its file and line, never an error. ``merge``/``prune`` compact every shard into the
plain pair (new files written beside, then renamed over), under an exclusive lock that a running tuner's shared
lock refuses, so compaction never deletes a shard being written.

The plain pair alone is a valid MetaSchedule JSON database (``ms.database.JSONDatabase(work_dir=...)`` reads it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmcc.errors import LlmccError
from llmcc.tuning.keys import describe_key, target_key

log = logging.getLogger("llmcc")

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
LOCK_FILE = ".llmcc-tuning.lock"


class TuningDatabaseError(LlmccError):
    """A tuning database folder that is missing, unreadable, or locked by a tuner."""


def workload_module(func):
    """The IRModule MetaSchedule keys a kernel by: the PrimFunc alone, named main (same form in tune and compile)."""
    import tvm

    func = func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)
    return tvm.IRModule({"main": func})


def run_secs(rec) -> float | None:
    """The mean measured time of a record in seconds (None for a failed build or run)."""
    secs = [float(s) for s in (rec.run_secs or [])]
    if not secs or min(secs) >= 1e9:
        return None
    return sum(secs) / len(secs)


def _shards(path: Path) -> list[tuple[Path, Path]]:
    """Every (workload file, record file) pair in the folder, the plain pair first."""
    pairs = []
    for workload in sorted(path.glob("database_workload*.json")):
        suffix = workload.name[len("database_workload"):]
        pairs.append((workload, path / f"database_tuning_record{suffix}"))
    pairs.sort(key=lambda pair: pair[0].name != WORKLOAD_FILE)
    return pairs


def _json_lines(file: Path):
    """(line number, parsed JSON list of two items or None if the line is corrupt) for each non-blank line."""
    if not file.is_file():
        return
    with open(file, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            yield number, item if isinstance(item, list) and len(item) == 2 else None


@dataclass
class _Entry:
    """One record line, kept as its JSON: parsing a trace costs milliseconds, so only the records a query returns
    are turned into MetaSchedule TuningRecords (``TuningDatabase.record``)."""

    shash: str             # the workload's structural hash, as in its workload line
    raw: list              # [trace, run_secs, target, args_info]
    key: tuple             # target_key of raw[2]
    secs: float | None     # mean run_secs, None for a failed run
    record: object = None  # the parsed TuningRecord, once asked for


_KEYS: dict[str, tuple] = {}


def _raw_target_key(target: dict) -> tuple:
    text = json.dumps(target, sort_keys=True)
    if text not in _KEYS:
        _KEYS[text] = target_key(target)
    return _KEYS[text]


def _raw_secs(run_secs_json) -> float | None:
    secs = [float(s) for s in (run_secs_json or [])]
    return None if not secs or min(secs) >= 1e9 else sum(secs) / len(secs)


def workload_hash(mod) -> str:
    """MetaSchedule's structural hash of a workload IRModule, as its workload lines store it."""
    from tvm.s_tir.meta_schedule.database import Workload

    return Workload(mod).as_json()[0]


class TuningDatabase:
    """A tuning database folder (module docstring), indexed in memory by workload and target.

    ``TuningDatabase(path)`` opens an existing database: a missing folder, or one with no database files, raises
    TuningDatabaseError naming the path; corrupt lines are skipped (``self.warnings``, also logged).
    ``create=True`` makes an empty database when the folder is absent or empty.
    """

    def __init__(self, path, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / WORKLOAD_FILE).touch(exist_ok=True)
            (self.path / RECORD_FILE).touch(exist_ok=True)
        elif not self.path.is_dir():
            raise TuningDatabaseError(f"tuning database {self.path}: no such folder")
        if not _shards(self.path):
            raise TuningDatabaseError(f"tuning database {self.path}: not a tuning database (no {WORKLOAD_FILE}); "
                                      f"create one with llmcc tune")
        self.reload()

    def reload(self) -> None:
        """Read every shard again (corrupt lines skipped, exact duplicates across shards dropped)."""
        self.workloads: dict[str, list] = {}   # shash -> workload line JSON
        self.entries: list[_Entry] = []
        self.warnings: list[str] = []
        self._parsed_workloads: dict[str, object] = {}
        self._by_workload: dict[str, list[_Entry]] = {}
        self._argument_shapes: list | None = None
        seen: set = set()
        for workload_file, record_file in _shards(self.path):
            hashes: list = []  # by line order, None where a line is corrupt (record lines count on the order)
            for number, item in _json_lines(workload_file):
                ok = item is not None and isinstance(item[0], str) and isinstance(item[1], str)
                hashes.append(item[0] if ok else None)
                if ok:
                    self.workloads.setdefault(item[0], item)
                else:
                    self.warnings.append(f"tuning database {workload_file}: line {number} is corrupt (not a "
                                         f"MetaSchedule workload); skipped")
            for number, item in _json_lines(record_file):
                entry = self._entry(item, hashes)
                if isinstance(entry, str):
                    self.warnings.append(f"tuning database {record_file}: line {number} {entry}; skipped")
                    continue
                identity = (entry.shash, json.dumps(entry.raw))
                if identity not in seen:
                    seen.add(identity)
                    self.entries.append(entry)
                    self._by_workload.setdefault(entry.shash, []).append(entry)
        for warning in self.warnings:
            log.warning("%s", warning)

    @staticmethod
    def _entry(item, hashes: list):
        """An _Entry for a record line, or why it cannot be one."""
        if item is None or not isinstance(item[0], int) or not 0 <= item[0] < len(hashes):
            return "is corrupt (not a MetaSchedule record)"
        if hashes[item[0]] is None:
            return "belongs to a corrupt workload line"
        raw = item[1]
        try:
            if not isinstance(raw, list) or len(raw) != 4:
                raise ValueError
            return _Entry(hashes[item[0]], raw, _raw_target_key(raw[2]), _raw_secs(raw[1]))
        except Exception:  # noqa: BLE001 - a target TVM cannot read, run_secs that are not numbers: corrupt
            return "is corrupt (not a MetaSchedule record)"

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, entry: _Entry):
        """The MetaSchedule TuningRecord of an entry (parsed once); None if its trace does not parse."""
        from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

        if entry.record is None:
            if entry.shash not in self._parsed_workloads:
                self._parsed_workloads[entry.shash] = Workload.from_json(self.workloads[entry.shash])
            try:
                entry.record = TuningRecord.from_json(entry.raw, self._parsed_workloads[entry.shash])
            except Exception:  # noqa: BLE001 - e.g. a trace of an instruction this TVM does not have
                log.warning("tuning database %s: a record of workload %s does not parse; skipped", self.path,
                            entry.shash)
                entry.record = False
        return entry.record or None

    def records(self, target=None) -> list:
        """Every record (failed runs included) as TuningRecords, or those whose target key equals ``target``'s."""
        key = target_key(target) if target is not None else None
        recs = (self.record(e) for e in self.entries if key is None or e.key == key)
        return [r for r in recs if r is not None]

    def targets(self) -> dict:
        """{target key description: record count}."""
        counts: dict[str, int] = {}
        for e in self.entries:
            name = describe_key(e.key)
            counts[name] = counts.get(name, 0) + 1
        return counts

    def argument_shapes(self) -> list[tuple]:
        """The distinct argument lists of the records, each ((dtype, (dims...)), ...): how length buckets are found
        (llmcc.tuning.buckets.candidate_lengths) without decoding any workload."""
        if self._argument_shapes is None:
            shapes = set()
            for e in self.entries:
                try:
                    shapes.add(tuple((str(a[1]), tuple(int(d) for d in a[2])) for a in e.raw[3]))
                except (TypeError, ValueError, IndexError):  # not tensor arguments: no bucket to find there
                    continue
            self._argument_shapes = sorted(shapes)
        return self._argument_shapes

    def kernel_entries(self, func) -> list[_Entry]:
        """The entries of kernel ``func`` (any target, failed runs included)."""
        return list(self._by_workload.get(workload_hash(workload_module(func)), ()))

    def kernel_records(self, func) -> list:
        """The records of kernel ``func`` (any target) that ran, fastest first."""
        ran = sorted((e for e in self.kernel_entries(func) if e.secs is not None), key=lambda e: e.secs)
        return [r for r in map(self.record, ran) if r is not None]

    def query(self, func, target):
        """The fastest record for kernel ``func`` measured on ``target``'s key, else None."""
        key = target_key(target)
        return next((r for r in self.kernel_records(func) if target_key(r.target) == key), None)

    @contextlib.contextmanager
    def writer(self):
        """A ShardWriter appending to a new shard of this folder (see ``shard_writer``)."""
        with shard_writer(self.path) as shard:
            yield shard

    def add(self, records) -> int:
        """Append TuningRecords (from another database, any target) to a new shard; returns how many."""
        with self.writer() as shard:
            for rec in records:
                shard.append(rec)
        self.reload()
        return shard.count


def open_database(path) -> TuningDatabase:
    return path if isinstance(path, TuningDatabase) else TuningDatabase(path)


@contextlib.contextmanager
def shard_writer(path):
    """A ShardWriter on a new shard of the database folder ``path``, under the folder's shared lock (reading the
    database is not needed to append to it)."""
    path = Path(path)
    with _locked(path, exclusive=False):
        shard = ShardWriter(path)
        try:
            yield shard
        finally:
            shard.close()


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool):
    """The folder's lock: shared for writers (many tuners at once), exclusive for compaction (no tuner running)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            if not exclusive:  # only a compaction holds it exclusively, and briefly: wait for it
                fcntl.flock(lock, fcntl.LOCK_SH)
            else:
                raise TuningDatabaseError(f"tuning database {path}: a tuner is writing to it; run this when it "
                                          f"has finished") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ShardWriter:
    """Appends records to this process's own shard pair, one flushed line per record, so a kill keeps every record
    written before it. Workload lines are written on a workload's first record."""

    def __init__(self, path: Path) -> None:
        writer = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self.workload_file = path / f"database_workload.{writer}.json"
        self.record_file = path / f"database_tuning_record.{writer}.json"
        self._workloads = open(self.workload_file, "a", encoding="utf-8")
        self._records = open(self.record_file, "a", encoding="utf-8")
        self._index: dict[str, int] = {}
        self.count = 0

    def append(self, record) -> None:
        self.append_json(record.workload.as_json(), record_json(record))

    def append_json(self, workload_json: list, record_json: list) -> None:
        """Append one record given as MetaSchedule JSON (its workload line, its record without the index)."""
        index = self._index.get(workload_json[0])
        if index is None:
            index = self._index[workload_json[0]] = len(self._index)
            self._workloads.write(json.dumps(workload_json) + "\n")
            self._workloads.flush()
        self._records.write(json.dumps([index, record_json]) + "\n")
        self._records.flush()
        self.count += 1

    def close(self) -> None:
        self._workloads.close()
        self._records.close()
        if not self.count:  # leave no empty shard behind
            self.workload_file.unlink(missing_ok=True)
            self.record_file.unlink(missing_ok=True)


_scratch_database = None


def record_json(record) -> list:
    """A TuningRecord as MetaSchedule's JSON ([trace, run_secs, target, args_info]).

    TuningRecord.as_json converts on the Python side, which fails on traces holding an IndexMap (dlight's CUDA
    schedules, any transform_layout); MetaSchedule's C++ JSONDatabase writes those. Such records go through a
    scratch JSONDatabase, and the line it appended is read back."""
    global _scratch_database
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord

    try:
        return TuningRecord.as_json(record)
    except TypeError:
        pass
    if _scratch_database is None:
        _scratch_database = ms.database.JSONDatabase(work_dir=tempfile.mkdtemp(prefix="llmcc-record-json-"))
    scratch = _scratch_database
    workload = scratch.commit_workload(record.workload.mod)
    end = os.path.getsize(scratch.path_tuning_record)
    scratch.commit_tuning_record(TuningRecord(record.trace, workload, record.run_secs, record.target,
                                              record.args_info))
    with open(scratch.path_tuning_record, "rb") as f:
        f.seek(end)
        return json.loads(f.read())[1]


def _write_compacted(path: Path, workloads: dict, entries: list, replaced: list[Path]) -> None:
    """Write ``entries`` (with their ``workloads`` lines) as the folder's plain pair (temp files renamed over it),
    then delete the ``replaced`` shards (their records are in the new pair; a crash before the delete only leaves
    duplicates, dropped on read)."""
    index: dict[str, int] = {}
    workload_lines, record_lines = [], []
    for entry in entries:
        if entry.shash not in index:
            index[entry.shash] = len(index)
            workload_lines.append(json.dumps(workloads[entry.shash]) + "\n")
        record_lines.append(json.dumps([index[entry.shash], entry.raw]) + "\n")
    for name, lines in ((WORKLOAD_FILE, workload_lines), (RECORD_FILE, record_lines)):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / name)
    keep = {path / WORKLOAD_FILE, path / RECORD_FILE}
    for file in replaced:
        if file not in keep:
            file.unlink(missing_ok=True)


def _shard_files(path: Path) -> list[Path]:
    return [f for pair in _shards(path) for f in pair]


# ---------------------------------------------------------------------------------------------------------------------
# db list / merge / prune


def list_database(path) -> dict:
    """What ``llmcc db list`` prints: per target key, records (ok / failed) and kernels; skipped lines."""
    db = TuningDatabase(path)
    targets: dict[str, dict] = {}
    for e in db.entries:
        row = targets.setdefault(describe_key(e.key), {"records": 0, "failed": 0, "kernels": set()})
        row["records"] += 1
        row["failed"] += e.secs is None
        row["kernels"].add(e.shash)
    shards = sum(1 for w, _ in _shards(db.path) if w.name != WORKLOAD_FILE)
    return {"db": str(db.path), "records": len(db), "shards": shards, "skipped_lines": db.warnings,
            "targets": {k: {**v, "kernels": len(v["kernels"])} for k, v in sorted(targets.items())}}


def merge_databases(sources, output) -> dict:
    """Every record of the ``sources`` folders (and of ``output``, if it holds a database already) compacted into
    ``output``; exact duplicates dropped. Returns {"db", "records", "skipped_lines"}."""
    output = Path(output)
    databases = [TuningDatabase(s) for s in sources]  # a missing source fails before anything is written
    with _locked(output, exclusive=True):
        if _shards(output) and output.resolve() not in {db.path.resolve() for db in databases}:
            databases.append(TuningDatabase(output))
        workloads, entries, seen, warnings = {}, [], set(), []
        for db in databases:
            warnings += db.warnings
            workloads.update(db.workloads)
            for entry in db.entries:
                identity = (entry.shash, json.dumps(entry.raw))
                if identity not in seen:
                    seen.add(identity)
                    entries.append(entry)
        _write_compacted(output, workloads, entries, _shard_files(output))
    return {"db": str(output), "records": len(entries), "skipped_lines": warnings}


def prune_database(path, targets: list[tuple] = (), keep_best: int | None = None) -> dict:
    """Compact ``path`` in place, dropping failed runs, every record of the ``targets`` keys, and (``keep_best``)
    all but the N fastest records of each kernel and target. Returns {"db", "kept", "dropped", "skipped_lines"}."""
    path = Path(path)
    if keep_best is not None and keep_best < 1:
        raise LlmccError(f"--keep-best must be at least 1; got {keep_best}")
    TuningDatabase(path)  # a missing folder is an error, not an empty database made by the lock
    with _locked(path, exclusive=True):
        db = TuningDatabase(path)
        drop = set(targets)
        groups: dict[tuple, list] = {}
        for entry in db.entries:
            if entry.key not in drop and entry.secs is not None:
                groups.setdefault((entry.shash, entry.key), []).append(entry)
        kept = []
        for entries in groups.values():
            entries.sort(key=lambda e: e.secs)
            kept += entries[:keep_best] if keep_best else entries
        _write_compacted(path, db.workloads, kept, _shard_files(path))
    return {"db": str(path), "kept": len(kept), "dropped": len(db) - len(kept), "skipped_lines": db.warnings}
