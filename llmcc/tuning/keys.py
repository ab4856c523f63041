"""Which target a tuning record belongs to, and how near another target is to it.

A record applies as it is to a compile target with the same key (``target_key``):

    llvm   ("llvm", mcpu, sorted mattr)   e.g. ("llvm", "znver4", ("-avx512f",)); num-cores, mtriple and other
                                          attributes are ignored (tuning adds num-cores for MetaSchedule)
    cuda   ("cuda", arch)                 e.g. ("cuda", "sm_90"); max_threads_per_block etc. are ignored

Keys print as ``cuda:sm_80`` and ``llvm:<mcpu>[:<mattr>,...]`` (``llvm:znver4:-avx512f``, ``llvm::+avx2,+fma``);
``parse_target`` reads those back, plus llmcc's target names (``cpu``, ``cuda:sm_90``).

Without a record for the compile target, records of the *nearest* target of the same kind are replayed
(``transfer_order``), nearest first:

    cuda   older or equal compute capability first, nearest first (for sm_89: sm_86, sm_80, sm_75, ...), then newer
           ones, nearest first: a kernel tuned for an older GPU uses no instruction a newer one lacks
    llvm   only targets whose vector features are a subset of the compile target's (avx2-only records run on an
           avx512 machine; avx512 records never go to an avx2 one), fewest missing features first, same mcpu first

A transferred record still has to replay, fit the target's limits and build there (llmcc.tuning.transfer).
"""

from __future__ import annotations

import functools
import json

from llmcc.errors import LlmccError

# LLVM feature names that change which vector instructions code may use; everything else LLVM reports (tuning
# flags, bit-manipulation extensions) does not decide whether a schedule's code runs or vectorizes alike.
VECTOR_FEATURE_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "neon", "sve", "dotprod", "i8mm", "fullfp16",
                           "bf16", "vnni")


def cuda_limits(arch: str):
    """The arch's figures from the target registry (llmcc.targets.CudaArch: threads and shared memory per block);
    an arch the registry does not know gets the most conservative one's (sm_75)."""
    from llmcc.targets import CUDA_ARCH_MODELS

    return CUDA_ARCH_MODELS.get(arch) or CUDA_ARCH_MODELS["sm_75"]


def _as_tvm_target(target):
    import tvm

    from llmcc.targets import TargetSpec

    if isinstance(target, TargetSpec):
        return target.tvm_target()
    if isinstance(target, dict):
        return tvm.target.Target(target)
    return target


def target_key(target) -> tuple:
    """The part of a target a record must share with the compile target to apply as it is (module docstring).

    ``target``: a tvm.target.Target, a dict in Target's JSON form, or an llmcc TargetSpec."""
    target = _as_tvm_target(target)
    kind = target.kind.name
    if kind == "cuda":
        return ("cuda", str(target.attrs.get("arch", "")))
    mattr = target.attrs.get("mattr")
    return (kind, str(target.attrs.get("mcpu", "") or ""), tuple(sorted(str(a) for a in (mattr or ()))))


def describe_key(key: tuple) -> str:
    """``cuda:sm_80`` / ``llvm:znver4:-avx512f``: what ``db list`` prints, reports say and ``parse_target`` reads."""
    if key[0] == "cuda":
        return f"cuda:{key[1]}"
    return f"{key[0]}:{key[1]}" + (f":{','.join(key[2])}" if key[2] else "")


def key_target(key: tuple):
    """A tvm Target with exactly what ``key`` says (the inverse of ``target_key``)."""
    import tvm

    if key[0] == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": key[1]})
    config = {"kind": key[0]}
    if key[1]:
        config["mcpu"] = key[1]
    if key[2]:
        config["mattr"] = list(key[2])
    return tvm.target.Target(config)


def parse_target(text: str, flag: str = "--target") -> tuple:
    """A target key from an llmcc target name (``cpu``, ``cuda:sm_90``), a key as ``describe_key`` prints it
    (``cuda:sm_75``, ``llvm:haswell``, ``llvm::+avx2,+fma``) or a TVM target dict in JSON; a one-line error naming
    ``flag`` otherwise."""
    from llmcc.targets import TARGETS, resolve

    text = text.strip()
    try:
        if text in TARGETS:
            return target_key(resolve(text))
        if text.startswith("{"):
            return target_key(json.loads(text))
        kind, _, rest = text.partition(":")
        if kind == "cuda" and rest.startswith("sm_") and rest[3:].isdigit():
            return ("cuda", rest)
        if kind == "llvm":
            mcpu, _, mattr = rest.partition(":")
            return target_key(key_target(("llvm", mcpu, tuple(filter(None, mattr.split(","))))))
    except LlmccError:
        raise
    except Exception as exc:  # a dict TVM refuses, an mcpu LLVM does not know
        lines = str(exc).strip().splitlines()
        raise LlmccError(f"{flag} {text}: not a target ({lines[-1][:200] if lines else type(exc).__name__})") from None
    raise LlmccError(f"{flag} {text}: not a target; use an llmcc target ({', '.join(TARGETS)}), cuda:sm_XY, "
                     f"llvm:MCPU[:+feature,-feature] or a TVM target dict in JSON")


@functools.cache
def vector_features(key: tuple) -> frozenset:
    """The vector features (VECTOR_FEATURE_PREFIXES) LLVM enables for an llvm key's mcpu and mattr."""
    from tvm.target import codegen

    features = codegen.llvm_get_cpu_features(key_target(key))
    return frozenset(str(f) for f in features if str(f).startswith(VECTOR_FEATURE_PREFIXES))


def _compute_capability(arch: str) -> int:
    digits = arch[3:] if arch.startswith("sm_") else ""
    return int(digits) if digits.isdigit() else -1


def transfer_distance(source: tuple, target: tuple):
    """How far a record of ``source`` is from ``target`` (smaller is nearer), or None when it must never be used
    there (another kind; llvm with a vector feature the target lacks). Equal keys are distance zero."""
    if source == target:
        return (0, 0, 0)
    if source[0] != target[0]:
        return None
    if source[0] == "cuda":
        src, dst = _compute_capability(source[1]), _compute_capability(target[1])
        if src < 0 or dst < 0:
            return None
        return (1, 0, dst - src) if src <= dst else (1, 1, src - dst)
    missing_here = vector_features(source) - vector_features(target)
    if missing_here:
        return None
    return (1, len(vector_features(target) - vector_features(source)), int(source[1] != target[1]))


def transfer_order(sources, target: tuple) -> list[tuple]:
    """The keys of ``sources`` that may transfer to ``target`` (itself excluded), nearest first."""
    ranked = []
    for key in set(sources):
        if key == target:
            continue
        distance = transfer_distance(key, target)
        if distance is not None:
            ranked.append((distance, describe_key(key), key))
    return [key for _, _, key in sorted(ranked)]
