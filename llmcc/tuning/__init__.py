"""Tuning: MetaSchedule (XGBoost cost model) schedules for llmcc's kernels, kept per target and reused across targets.

    keys.py       which target a record belongs to; the distance to another target (what may transfer where)
    database.py   the database folder: per-writer shards, corrupt lines skipped, merge / prune / list
    transfer.py   a kernel's schedule for a compile target: its own record, a validated transferred one, or none
    search.py     ``tune``: measure candidates locally or through a TVM RPC tracker into the database

A kernel's workload is its lowered PrimFunc (after llmcc's ``lower`` phase) renamed ``main``; MetaSchedule keys it by
structural hash, so the same kernel in another model finds the same records. The ``llmcc tune`` and ``llmcc db``
commands are thin layers over the functions re-exported here.
"""

from llmcc.tuning.database import (TuningDatabase, TuningDatabaseError, list_database, merge_databases, open_database,
                                   prune_database, run_secs, shard_writer, workload_hash, workload_module)
from llmcc.tuning.keys import describe_key, parse_target, target_key, transfer_order
from llmcc.tuning.search import lowered_kernels, tune
from llmcc.tuning.transfer import ScheduleChoice, choose_schedule

__all__ = ["ScheduleChoice", "TuningDatabase", "TuningDatabaseError", "choose_schedule", "describe_key",
           "list_database", "lowered_kernels", "merge_databases", "open_database", "parse_target", "prune_database",
           "run_secs", "shard_writer", "target_key", "transfer_order", "tune", "workload_hash", "workload_module"]
