"""Source models read one tensor at a time: an HF folder (safetensors) or a GGUF file.

Conversion never holds the whole fp32 model: each tensor is read, converted and written
before the next is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgerank.errors import ModelFormatError, UnsupportedModelError

SUPPORTED_ARCHS = {"llama", "qwen2", "qwen3", "bert"}


@dataclass(frozen=True)
class ArchConfig:
    """The dimensions a converter needs, read from config.json or GGUF metadata."""

    arch: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    norm_eps: float
    tied_embeddings: bool
    type_vocab_size: int = 0  # BERT token types


def hf_config(folder: Path) -> ArchConfig:
    """Dimensions of an HF decoder; a clear error for what edgerank cannot convert."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder} has no config.json: not a Hugging Face model folder")
    c = json.loads(path.read_text())
    arch = c.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"cannot convert model type {arch!r} to GGUF; supported: {', '.join(sorted(SUPPORTED_ARCHS))}")
    rope = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    heads = c["num_attention_heads"]
    return ArchConfig(
        arch=arch, n_layers=c["num_hidden_layers"], hidden=c["hidden_size"],
        ffn=c["intermediate_size"], n_heads=heads, n_kv_heads=c.get("num_key_value_heads", heads),
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab_size=c["vocab_size"],
        context_length=c.get("max_position_embeddings", 2048), rope_theta=float(rope),
        norm_eps=float(c.get("rms_norm_eps", c.get("layer_norm_eps", 1e-6))),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)) and arch != "bert",
        type_vocab_size=int(c.get("type_vocab_size", 0)),
    )


def iter_safetensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, fp32 array) for every tensor of every shard, one at a time."""
    from safetensors import safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelFormatError(f"{folder} has no .safetensors weights")
    for shard in shards:
        with safe_open(shard, framework="pt") as f:  # torch reads bf16, numpy cannot
            for name in f.keys():
                yield name, f.get_tensor(name).float().numpy()


def safetensors_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            names.extend(f.keys())
    return names


def iter_gguf(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array in numpy row-major shape) for every tensor, dequantized."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        yield t.name, data.reshape(shape)
