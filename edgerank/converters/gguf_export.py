"""HF folder or GGUF file -> llama.cpp GGUF (f16, q8_0, q4_0, q4_1 directly; q4_k_m via llama.cpp).

Written with the ``gguf`` package's writer: all tensor infos first, then each tensor's
data streamed in the same order, so one tensor is in memory at a time. HF names become
GGUF names through gguf's own ``TensorNameMap``. For yes/no rerankers it also writes what
llama.cpp's rank pooling needs: pooling type RANK, the labels, and ``cls.output``, the
label rows of the LM head.

A model trained with a LoRA adapter (a folder with ``adapter.safetensors``, from
``edgerank.train``) is split for the quantized types: a fine-tuned update is far smaller
than a 4-bit (or 8-bit) step, so quantizing the merged weights would round the training
away. The model file then holds the base (merged - B@A) and names, in
``edgerank.lora_adapter``, a llama.cpp LoRA adapter GGUF beside it that holds A and B in
fp32. llama.cpp applies it at run time (``llama-server --lora FILE``; the llamacpp backend
loads it by itself). f16 keeps the merged weights: an f16 step is small enough.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from gguf.quants import quant_shape_to_byte_shape, quantize
from tqdm.auto import tqdm

from edgerank.converters.tensors import ArchConfig, hf_config, iter_gguf, iter_safetensors
from edgerank.converters.vocab import add_tokenizer
from edgerank.errors import UnsupportedModelError
from edgerank.sources import FAMILY_KEY, LORA_KEY
from edgerank.specs import ModelSpec

QUANTS = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    # min + q * d per block of 32: the grid the edgerank int4 artifact uses, and the one a
    # Q4_1 base model (SmolLM2) already sits on, so such a base re-exports without loss
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_k_m": (None, gguf.LlamaFileType.MOSTLY_Q4_K_M),  # llama.cpp's quantizer, from f16
}
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "bert": gguf.MODEL_ARCH.BERT}
# Not part of a mean-pooled BERT embedding graph (llama.cpp drops the pooler, which is why
# llama.cpp cannot score BERT cross-encoders; bi-encoders need no pooler).
SKIPPED = ("rotary_emb.inv_freq", "position_ids", "pooler.")
# llama.cpp adds these to f32 activations directly (an f16 operand aborts the graph).
KEEP_F32 = {"cls.output.weight", "position_embd.weight", "token_types.weight"}
# llama.cpp attaches a rank-pooling head (cls.output) to these decoder archs only; for the
# others an extra tensor makes the file unloadable ("wrong number of tensors").
RANK_POOLING_ARCHS = {"qwen3"}


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> the interleaved pairs llama.cpp's llama arch expects."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(names, hf_name: str, arch: str) -> str:
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UnsupportedModelError(f"tensor {hf_name!r} has no GGUF name for arch {arch}")
    return name


def _for_llama_cpp(name: str, w: np.ndarray, cfg: ArchConfig) -> np.ndarray:
    """llama's q/k rows in llama.cpp's rope order (applies to a LoRA B as to the weight)."""
    if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        return permute_rope(w, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)
    return w


def _hf_tensors(folder: Path, cfg: ArchConfig, spec: ModelSpec | None, label_ids: list[int] | None,
                lora: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) from an HF folder, plus cls.output for rank pooling.
    Weights with an entry in ``lora`` come out as the base, merged - B@A."""
    names = gguf.get_tensor_name_map(ARCHS[cfg.arch], cfg.n_layers)
    head = None
    for hf_name, w in iter_safetensors(folder):
        if any(part in hf_name for part in SKIPPED):
            continue
        name = _gguf_name(names, hf_name, cfg.arch)
        if hf_name in lora:
            a, b = lora[hf_name]
            w = (w.astype(np.float64) - b @ a.astype(np.float64)).astype(np.float32)
        w = _for_llama_cpp(name, w, cfg)
        if name == "output.weight" or (name == "token_embd.weight" and cfg.tied_embeddings):
            head = w[label_ids].copy() if label_ids else None
        yield name, w
    if label_ids:
        yield "cls.output.weight", head


def _target_type(name: str, w: np.ndarray, qtype) -> tuple[gguf.GGMLQuantizationType, str | None]:
    """The stored type of one tensor, and the reason when it is not the requested one."""
    if w.ndim < 2 or name in KEEP_F32:
        return gguf.GGMLQuantizationType.F32, None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16, f"row length {w.shape[-1]} is not a multiple of {block}"
    return qtype, None


def _stored_layout(shape: tuple[int, ...], t) -> tuple[np.dtype, int, gguf.GGMLQuantizationType | None]:
    """(numpy dtype, bytes, raw GGML type) of a tensor of ``shape`` stored as ``t``."""
    n = int(np.prod(shape))
    if t == gguf.GGMLQuantizationType.F32:
        return np.dtype(np.float32), 4 * n, None
    if t == gguf.GGMLQuantizationType.F16:
        return np.dtype(np.float16), 2 * n, None
    return np.dtype(np.uint8), int(np.prod(quant_shape_to_byte_shape(shape, t))), t


def _encode(w: np.ndarray, qtype) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return w.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16)
    return quantize(w.astype(np.float32), qtype)


def write_gguf(src: Path, dest: Path, quant: str, spec: ModelSpec | None, label_ids: list[int] | None,
               progress: bool = True, adapter_dest: Path | None = None) -> dict:
    """Convert ``src`` (HF folder or .gguf) to ``dest``; returns notes for the report.

    With ``adapter_dest``, ``src``'s LoRA adapter stays unmerged: ``dest`` gets the base
    weights and ``adapter_dest`` (a sibling of ``dest``) the adapter, as llama.cpp reads it.
    """
    if quant not in QUANTS:
        raise ValueError(f"GGUF quant {quant!r} not supported; choose from {', '.join(QUANTS)}")
    qtype, ftype = QUANTS[quant]
    if qtype is None:  # K-quants: an f16 GGUF first, then llama.cpp's own quantizer
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            f16 = Path(tmp) / "f16.gguf"
            notes = write_gguf(src, f16, "f16", spec, label_ids, progress, adapter_dest)
            _llama_quantize(f16, dest, ftype)  # metadata (the adapter's name too) carries over
        notes["quantizer"] = "llama_cpp.llama_model_quantize"
        return notes
    if src.is_dir():
        cfg = hf_config(src)
        arch = cfg.arch
        if arch not in ARCHS:
            raise UnsupportedModelError(
                f"model type {arch!r} has no llama.cpp GGUF mapping here; convert it to the ONNX artifact instead")
        if arch not in RANK_POOLING_ARCHS or not (spec and spec.score.kind == "yes_no"):
            label_ids = None
    else:
        from edgerank.sources import gguf_metadata

        arch = gguf_metadata(src)["general.architecture"]

    lora = {}
    if adapter_dest is not None:
        from edgerank.adapters import adapter_file, lora_updates

        lora = lora_updates(adapter_file(src))

    def make() -> Iterator[tuple[str, np.ndarray]]:  # read twice: shapes first, then data
        return _hf_tensors(src, cfg, spec, label_ids, lora) if src.is_dir() else iter_gguf(src)
    writer = gguf.GGUFWriter(str(dest), arch)
    notes: dict = {"fallbacks": {}}
    if src.is_dir():
        _add_hf_metadata(writer, cfg, src, spec, ftype, notes)
    else:
        _copy_gguf_metadata(writer, src, ftype)
    if lora:
        writer.add_string(LORA_KEY, adapter_dest.name)
        _write_lora_gguf(lora, cfg, adapter_dest)
        notes["lora"] = (f"{len(lora)} projections: base weights quantized, LoRA update kept unmerged in fp32 "
                         f"in {adapter_dest.name} ({adapter_dest.stat().st_size} bytes)")
    # pass 1: shapes and types only (each tensor is read, then dropped)
    plan = []
    for name, w in make():
        t, why = _target_type(name, w, qtype)
        if why:
            notes["fallbacks"][name] = f"kept at {t.name}: {why}"
        dtype, nbytes, raw = _stored_layout(w.shape, t)
        shape = quant_shape_to_byte_shape(w.shape, t) if raw is not None else w.shape  # gguf wants bytes
        writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
        plan.append((name, t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # pass 2: the data, converted tensor by tensor
    for (name, t), (name2, w) in zip(tqdm(plan, desc=f"GGUF {quant}", unit="tensor", disable=not progress), make()):
        assert name == name2
        writer.write_tensor_data(_encode(w, t))
    writer.close()
    notes["tensors"] = len(plan)
    return notes


def _write_lora_gguf(lora: dict, cfg: ArchConfig, dest: Path) -> None:
    """A llama.cpp LoRA adapter: ``NAME.lora_a`` [r, in] and ``NAME.lora_b`` [out, r] per
    adapted weight. B already carries alpha/r, so ``adapter.lora.alpha`` = r (scale 1)."""
    names = gguf.get_tensor_name_map(ARCHS[cfg.arch], cfg.n_layers)
    writer = gguf.GGUFWriter(str(dest), cfg.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    ranks = {a.shape[0] for a, _ in lora.values()}
    if len(ranks) != 1:
        raise ValueError(f"the adapter mixes LoRA ranks {sorted(ranks)}")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(ranks.pop()))
    for hf_name in sorted(lora):
        a, b = lora[hf_name]
        name = _gguf_name(names, hf_name, cfg.arch)
        writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(name + ".lora_b", np.ascontiguousarray(_for_llama_cpp(name, b, cfg), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hf_metadata(writer, cfg: ArchConfig, src: Path, spec, ftype, notes: dict) -> None:
    writer.add_name(src.name)
    if spec is not None:
        writer.add_string(FAMILY_KEY, spec.family)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn)
    writer.add_head_count(cfg.n_heads)
    writer.add_file_type(ftype)
    notes["tokenizer"] = add_tokenizer(writer, src, cfg.vocab_size)
    if cfg.arch == "bert":
        writer.add_layer_norm_eps(cfg.norm_eps)
        writer.add_causal_attention(False)
        writer.add_pooling_type(gguf.PoolingType.MEAN)
        writer.add_token_type_count(cfg.type_vocab_size)
        return
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.arch in RANK_POOLING_ARCHS and spec is not None and spec.score.kind == "yes_no":
        writer.add_pooling_type(gguf.PoolingType.RANK)
        writer.add_classifier_output_labels([label.strip() for label in spec.score.labels])
        notes["rank_pooling"] = list(spec.score.labels)


def _copy_gguf_metadata(writer, src: Path, ftype) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(src))
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), vtype, sub_type=sub)
    writer.add_file_type(ftype)


def _llama_quantize(src: Path, dest: Path, ftype) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with code {rc}")
