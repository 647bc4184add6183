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

from edgerank.converters.adapters import ADAPTER_FILE
from edgerank.converters.safetensors_file import SafetensorsFile
from edgerank.errors import ModelFormatError, UnsupportedModelError

SUPPORTED_ARCHS = {"llama", "qwen2", "qwen3", "bert", "xlm-roberta"}


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
    rope_scaling: dict | None = None  # e.g. Llama 3.x "llama3" frequency scaling
    pad_token_id: int = 0  # XLM-R positions start after it


def hf_config(folder: Path) -> ArchConfig:
    """Dimensions of an HF decoder; a clear error for what edgerank cannot convert."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder} has no config.json: not a Hugging Face model folder")
    c = json.loads(path.read_text())
    arch = c.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"cannot convert model type {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHS))}")
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
        rope_scaling=c.get("rope_scaling"), pad_token_id=int(c.get("pad_token_id") or 0),
    )


def weight_shards(folder: Path) -> list[Path]:
    """An HF folder's safetensors weight shards; a trained model's LoRA adapter file
    (``adapter.safetensors``, which the converters read on their own) is not one."""
    shards = sorted(p for p in Path(folder).glob("*.safetensors") if p.name != ADAPTER_FILE)
    if not shards:
        raise ModelFormatError(f"{folder} has no .safetensors weights")
    return shards


def iter_safetensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, fp32 array) for every tensor of every shard, one at a time."""
    for shard in weight_shards(folder):
        f = SafetensorsFile(shard)
        for name in f.keys():
            yield name, f.get(name, float32=True)


def iter_gguf(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array in numpy row-major shape) for every tensor, dequantized."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    for t in reader.tensors:
        yield t.name, _dequantized(t)


def _dequantized(t) -> np.ndarray:
    """One GGUF tensor as fp32 in numpy row-major shape (GGUF lists dims fastest-first)."""
    from gguf.quants import dequantize

    data = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    return data.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))


# GGUF tensor names -> HF names, for re-exporting a GGUF decoder in HF layout.
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows (llama arch) -> HF's rotate-half layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class TensorReader:
    """Random access to a source's tensors by HF name, one fp32 array at a time.

    Reads safetensors shards lazily, or a GGUF file (memory-mapped, dequantized per
    tensor, names mapped back to HF and llama q/k rows un-permuted)."""

    def __init__(self, src: Path) -> None:
        self.src = Path(src)
        self._index: dict[str, object] = {}
        if self.src.is_dir():
            for shard in weight_shards(self.src):
                f = SafetensorsFile(shard)
                for name in f.keys():
                    self._index[name] = f
            self.config = hf_config(self.src)
        else:
            from gguf import GGUFReader

            self._reader = GGUFReader(str(self.src))
            self.config = gguf_config(self.src, self._reader)
            for t in self._reader.tensors:
                self._index[_hf_name(t.name)] = t

    def source_type(self, name: str) -> str | None:
        """The GGUF storage type of a tensor (``Q4_K``, ``Q6_K``, ...); None for safetensors."""
        handle = self._index.get(name)
        return None if self.src.is_dir() or handle is None else handle.tensor_type.name

    @property
    def has_4bit(self) -> bool:
        """A GGUF source with 4-bit tensors (Q4_0/Q4_1/Q4_K...): a deliberate quant mix."""
        return not self.src.is_dir() and any(str(self.source_type(n)).startswith(("Q4", "IQ4")) for n in self._index)

    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> np.ndarray:
        handle = self._index.get(name)
        if handle is None:
            raise ModelFormatError(f"{self.src} has no tensor {name!r}")
        if self.src.is_dir():  # read into its own array: no shard stays mapped
            return handle.get(name, float32=True)
        w = _dequantized(handle)
        _drop_mapped_pages(self._reader)
        if self.config.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rope(w, self.config.n_heads if "q_proj" in name else self.config.n_kv_heads)
        return w


def _drop_mapped_pages(reader) -> None:
    """Let the kernel drop the GGUF file pages this process touched (they are re-read on
    demand), so reading a large file tensor by tensor does not grow the resident set."""
    import mmap

    m = getattr(reader.data, "_mmap", None)
    if m is not None and hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED)


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TO_HF:
        return _GGUF_TO_HF[gguf_name]
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if parts[0] == "blk" and parts[2] in _GGUF_BLOCK_TO_HF:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK_TO_HF[parts[2]]}.{parts[3]}"
    return gguf_name


def gguf_config(path: Path, reader) -> ArchConfig:
    """Dimensions of a GGUF decoder from its metadata (``edgerank.runtime.sources.gguf_metadata``)."""
    from edgerank.runtime.gguf_header import gguf_metadata

    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch not in {"llama", "qwen2", "qwen3"}:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} cannot be re-exported; llama, qwen2, qwen3 can")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    tensors = {t.name: t for t in reader.tensors}
    return ArchConfig(
        arch=arch, n_layers=get("block_count"), hidden=hidden, ffn=get("feed_forward_length"),
        n_heads=heads, n_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads), vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        context_length=get("context_length", 2048), rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        tied_embeddings="output.weight" not in tensors,
    )
