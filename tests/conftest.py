"""Session fixtures: the tiny model compiled once, and its artifact; a fresh random seed per test."""

import os
import secrets
from pathlib import Path

import pytest

from helpers import make_tiny_onnx


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_module(tiny_onnx):
    import llmcc

    return llmcc.compile(tiny_onnx, target="cpu")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_module, tmp_path_factory) -> Path:
    return tiny_module.save(tmp_path_factory.mktemp("art") / "tiny.llmcc")



@pytest.fixture
def seed():
    """A fresh seed per test (LLMCC_TEST_SEED=<int> replays one); tests put it in their failure messages."""
    return int(os.environ.get("LLMCC_TEST_SEED") or secrets.randbits(31))
