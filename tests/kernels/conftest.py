"""Fixtures for the Triton kernel tests: they run on the CPU in Triton's interpreter (TRITON_INTERPRET=1).

Interpret mode is set per test (monkeypatch, undone afterwards) rather than for the whole session: Triton reads
TRITON_INTERPRET when it decorates a @triton.jit function, and a process-wide setting would also turn Triton kernels
of other tests (AOT compiles, TVM embedding) into interpreted ones. The llmcc kernels pick their flavour at launch
time (llmcc.kernels._common.launchable) and avoid triton's own @jit helpers (tl.max, tl.sum, tl.zeros), so this
works whether or not triton was imported earlier in the process, in either mode.
"""
import os

import pytest


@pytest.fixture(autouse=True)
def triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from llmcc.kernels import _common

    if not _common.interpret_mode():  # triton.knobs.runtime.interpret pinned in code overrides the env var
        pytest.fail("TRITON_INTERPRET=1 did not engage triton's interpreter (triton.knobs.runtime.interpret pinned?)")
    yield


def cuda_aot_available() -> str | None:
    """None if triton can compile for CUDA here (nvidia backend + ptxas), else the reason it cannot."""
    try:
        import triton
        from triton.backends import backends

        if "nvidia" not in backends:
            return "triton has no nvidia backend installed"
        path = triton.knobs.nvidia.ptxas.path
        if not path or not os.path.exists(path):
            return "no ptxas found for triton"
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton CUDA backend unusable: {type(e).__name__}: {e}"
    return None


@pytest.fixture
def aot_env(monkeypatch, tmp_path):
    """Compiled (not interpreted) mode and an empty Triton cache, so a real compile happens."""
    reason = cuda_aot_available()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    yield
