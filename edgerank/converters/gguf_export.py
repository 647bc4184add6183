"""HF folder or GGUF file -> llama.cpp GGUF (f16, q8_0, q4_0, q4_1 directly; q4_k_m via llama.cpp).

Written with the ``gguf`` package's writer: all tensor infos first, then each tensor's
data streamed in the same order, so one tensor is in memory at a time. HF names become
GGUF names through gguf's own ``TensorNameMap``.

What ``llama-server --reranking`` needs to score as edgerank does (``/v1/rerank``):

- every decoder family gets ``tokenizer.chat_template.rerank``, its prompt with the
  instruction filled in and ``{query}``/``{document}`` left for the server
  (``PromptTemplate.rerank_template``); the server's prompt is then token for token
  edgerank's (tests/test_llama_server_rerank.py);
- yes/no families get pooling type RANK. On qwen3, llama.cpp's rank head is
  ``cls.output`` (the label rows of the LM head) followed by a softmax, so
  ``relevance_score`` is p(yes), edgerank's score itself. llama.cpp gives no other decoder
  arch a rank head: on llama/qwen2 it returns component 0 of the last token's normed
  hidden state. There the converter rotates the residual stream (``rank_readout``) so that
  this component is the yes-minus-no logit, and ``relevance_score`` is that logit:
  edgerank's score is its sigmoid. ``edgerank.relevance_score`` in the file says which.

A model trained with a LoRA adapter (a folder with ``adapter.safetensors``, from
``edgerank.train.trainer``) is split for the quantized types: a fine-tuned update is far smaller
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
from edgerank.runtime.sources import FAMILY_KEY, LORA_KEY
from edgerank.runtime.specs import ModelSpec

RERANK_TEMPLATE_KEY = gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name="rerank")
# What llama-server's relevance_score is for this file: "probability" (edgerank's score) or
# "logit" (edgerank's score is its sigmoid).
RELEVANCE_KEY = "edgerank.relevance_score"

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
# llama.cpp attaches a rank-pooling head (cls.output, then a softmax) to these decoder archs
# only; for the others an extra tensor makes the file unloadable ("wrong number of tensors").
RANK_POOLING_ARCHS = {"qwen3"}
# Decoder archs whose rank pooling returns the normed last hidden state's component 0: the
# converter rotates their residual stream so that it is the label logit (rank_readout).
READOUT_ARCHS = {"llama", "qwen2"}


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


def _with_cls_output(stream: Iterator[tuple[str, np.ndarray]], label_ids: list[int] | None
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """A GGUF source's tensors, plus ``cls.output`` (the label rows of the LM head) when the
    source has none yet."""
    head, tied_head, has_cls = None, None, False
    for name, w in stream:
        if label_ids and name == "output.weight":
            head = w[label_ids].copy()
        elif label_ids and name == "token_embd.weight":
            tied_head = w[label_ids].copy()
        has_cls |= name == "cls.output.weight"
        yield name, w
    if label_ids and not has_cls:
        yield "cls.output.weight", head if head is not None else tied_head


# Readers of the residual stream (each after an RMSNorm whose weight gets folded into it)
# and writers to it, by GGUF tensor kind.
_READERS = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm",
            "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm"}
_WRITERS = ("attn_output", "ffn_down")


class RankReadout:
    """Makes component 0 of a llama/qwen2 model's normed last hidden state its label logit.

    llama.cpp's rank pooling on these archs has no head: ``relevance_score`` is component 0
    of ``output_norm(h)``. RMSNorm without its weight commutes with an orthogonal map of the
    residual stream, so: fold every norm weight into the matrices that read its output,
    reflect the stream with the Householder ``H`` (``H e0 = u``, ``u`` the unit vector of
    ``v = g_final * (W_pos - W_neg)``), and give the final norm the weight ``|v|`` on
    component 0 and 1 elsewhere (the LM head divides it back out). Component 0 is then
    ``v . h / rms(h)``, the positive-minus-negative logit, and every logit of the LM head is
    unchanged (up to rounding), so the file scores as before everywhere else.
    """

    def __init__(self, w: np.ndarray | None, scale: float, final_norm: np.ndarray, norms: dict[str, np.ndarray],
                 tied: bool) -> None:
        self.w, self.scale, self.final_norm, self.norms, self.tied = w, scale, final_norm, norms, tied
        self.gain = np.ones_like(final_norm, dtype=np.float64)
        self.gain[0] = scale

    @classmethod
    def from_source(cls, src: Path, label_ids: list[int]) -> "RankReadout":
        from edgerank.converters.tensors import TensorReader

        reader = TensorReader(src)
        n_layers = reader.config.n_layers
        final = reader.get("model.norm.weight").astype(np.float64)
        tied = "lm_head.weight" not in reader
        rows = reader.get("model.embed_tokens.weight" if tied else "lm_head.weight")[label_ids].astype(np.float64)
        v = final * (rows[0] - rows[1])
        scale = float(np.linalg.norm(v))
        if not scale > 0:
            raise ValueError("the answer labels' LM-head rows are equal: the model cannot tell them apart")
        u = v / scale
        e0_minus_u = -u
        e0_minus_u[0] += 1.0
        gap = float(np.linalg.norm(e0_minus_u))
        w = None if gap < 1e-12 else e0_minus_u / gap  # H = I - 2 w w^T swaps e0 and u
        norms = {}
        for i in range(n_layers):
            norms[f"blk.{i}.attn_norm"] = reader.get(f"model.layers.{i}.input_layernorm.weight").astype(np.float64)
            norms[f"blk.{i}.ffn_norm"] = reader.get(f"model.layers.{i}.post_attention_layernorm.weight"
                                                    ).astype(np.float64)
        return cls(w, scale, final, norms, tied)

    def _right(self, m: np.ndarray) -> np.ndarray:  # m @ H
        return m if self.w is None else m - 2.0 * np.outer(m @ self.w, self.w)

    def _left(self, m: np.ndarray) -> np.ndarray:  # H @ m (a vector or a matrix)
        if self.w is None:
            return m
        return m - 2.0 * (np.outer(self.w, self.w @ m) if m.ndim == 2 else self.w * (self.w @ m))

    def _head(self, m: np.ndarray) -> np.ndarray:
        return self._right(m.astype(np.float64) * self.final_norm) / self.gain

    def apply(self, name: str, w: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """The tensor(s) that replace ``name`` in the rotated model."""
        parts = name.split(".")
        kind = parts[2] if parts[0] == "blk" and len(parts) == 4 else None
        x = w.astype(np.float64)
        if name == "token_embd.weight":
            yield name, self._right(x).astype(np.float32)
            if self.tied:  # the LM head now differs from the embeddings
                yield "output.weight", self._head(x).astype(np.float32)
        elif name == "output.weight":
            yield name, self._head(x).astype(np.float32)
        elif name == "output_norm.weight":
            yield name, self.gain.astype(np.float32)
        elif kind in ("attn_norm", "ffn_norm") and parts[3] == "weight":
            yield name, np.ones_like(w, dtype=np.float32)
        elif kind in _READERS and parts[3] == "weight":
            yield name, self._right(x * self.norms[f"blk.{parts[1]}.{_READERS[kind]}"]).astype(np.float32)
        elif kind in _WRITERS:
            yield name, self._left(x).astype(np.float32)
        else:  # q/k norms and q/k/v biases act inside a layer: unchanged
            yield name, w

    def apply_all(self, stream: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        for name, w in stream:
            yield from self.apply(name, w)


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
               progress: bool = True, adapter_dest: Path | None = None, instruction: str | None = None,
               rank_readout: bool = True) -> dict:
    """Convert ``src`` (HF folder or .gguf) to ``dest``; returns notes for the report.

    ``label_ids`` are the answer labels' token ids (decoders with a yes/no formula): they
    pick the rank head's rows. ``instruction`` fills the rerank template (default: the
    family's). With ``adapter_dest``, ``src``'s LoRA adapter stays unmerged: ``dest`` gets
    the base weights and ``adapter_dest`` (a sibling of ``dest``) the adapter, as llama.cpp
    reads it. ``rank_readout`` False leaves a llama/qwen2 model's weights unrotated (see
    ``RankReadout``); llama-server's relevance_score then is not the model's score.
    """
    if quant not in QUANTS:
        raise ValueError(f"GGUF quant {quant!r} not supported; choose from {', '.join(QUANTS)}")
    qtype, ftype = QUANTS[quant]
    if qtype is None:  # K-quants: an f16 GGUF first, then llama.cpp's own quantizer
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            f16 = Path(tmp) / "f16.gguf"
            notes = write_gguf(src, f16, "f16", spec, label_ids, progress, adapter_dest, instruction, rank_readout)
            _llama_quantize(f16, dest, ftype)  # metadata (the adapter's name too) carries over
        notes["quantizer"] = "llama_cpp.llama_model_quantize"
        return notes
    cfg, meta = _source_config(src)
    arch = cfg.arch if cfg is not None else meta["general.architecture"]
    yes_no = spec is not None and spec.kind == "decoder" and spec.score.kind == "yes_no" and bool(label_ids)
    rank_head = yes_no and arch in RANK_POOLING_ARCHS

    lora = {}
    if adapter_dest is not None:
        from edgerank.converters.adapters import adapter_file, lora_updates

        lora = lora_updates(adapter_file(src))
    notes: dict = {"fallbacks": {}}
    readout = _readout(src, meta, spec, label_ids, bool(lora), rank_readout, notes) if yes_no and \
        arch in READOUT_ARCHS else None

    def make() -> Iterator[tuple[str, np.ndarray]]:  # read twice: shapes first, then data
        if src.is_dir():
            stream = _hf_tensors(src, cfg, spec, label_ids if rank_head else None, lora)
        else:
            stream = _with_cls_output(iter_gguf(src), label_ids if rank_head else None)
        return readout.apply_all(stream) if readout is not None else stream
    writer = gguf.GGUFWriter(str(dest), arch)
    if src.is_dir():
        _add_hf_metadata(writer, cfg, src, spec, ftype, notes)
    else:
        _copy_gguf_metadata(writer, src, ftype, spec)
    _add_rerank_metadata(writer, arch, spec, instruction, rank_head, readout is not None or
                         meta.get(RELEVANCE_KEY) == "logit", notes)
    if lora:
        writer.add_string(LORA_KEY, adapter_dest.name)
        _write_lora_gguf(lora, cfg, adapter_dest)
        notes["lora"] = (f"{len(lora)} projections: base weights quantized, LoRA update kept unmerged in fp32 "
                         f"in {adapter_dest.name} ({adapter_dest.stat().st_size} bytes)")
    notes["tensors"] = _write_tensors(writer, make, qtype, quant, progress, notes)
    return notes


def _source_config(src: Path) -> tuple[ArchConfig | None, dict]:
    """An HF folder's architecture config (refused where llama.cpp has no mapping for it), or
    a GGUF file's metadata."""
    if not src.is_dir():
        from edgerank.runtime.gguf_header import gguf_metadata

        return None, gguf_metadata(src)
    cfg = hf_config(src)
    if cfg.arch not in ARCHS:
        raise UnsupportedModelError(
            f"model type {cfg.arch!r} has no llama.cpp GGUF mapping here; convert it to the ONNX artifact instead")
    return cfg, {}


def _readout(src: Path, meta: dict, spec: ModelSpec, label_ids: list[int], lora: bool, rank_readout: bool,
             notes: dict) -> RankReadout | None:
    """The rotation that makes llama-server's rank pooling return a yes/no model's logit,
    where it applies (``RankReadout``); ``notes`` say whether it was applied and why."""
    if meta.get(RELEVANCE_KEY) == "logit":
        notes["rank_readout"] = "kept: the source's residual stream is already rotated"
        return None
    if lora or not rank_readout:
        why = "the LoRA adapter would need rotating too" if lora else "turned off (--no-rank-readout)"
        notes["rank_readout"] = (f"not applied: {why}; llama-server's relevance_score is not the model's "
                                 "score for this file (edgerank's backends are unaffected)")
        return None
    notes["rank_readout"] = (f"residual stream rotated: llama-server's relevance_score is the "
                             f"{spec.score.labels[0].strip()}-minus-{spec.score.labels[1].strip()} logit")
    return RankReadout.from_source(src, label_ids)


def _write_tensors(writer: gguf.GGUFWriter, make, qtype, quant: str, progress: bool, notes: dict) -> int:
    """Write the tensors ``make()`` yields in two passes (shapes and types, then data, each
    tensor read and dropped in turn, so memory holds one at a time); returns how many."""
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
    for (name, t), (name2, w) in zip(tqdm(plan, desc=f"GGUF {quant}", unit="tensor", disable=not progress), make()):
        assert name == name2
        writer.write_tensor_data(_encode(w, t))
    writer.close()
    return len(plan)


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


def _add_rerank_metadata(writer, arch: str, spec: ModelSpec | None, instruction: str | None, rank_head: bool,
                         logit_readout: bool, notes: dict) -> None:
    """What llama-server's /v1/rerank reads: the rerank template, the pooling type, the labels."""
    if instruction is not None and not (spec is not None and spec.takes_instruction):
        raise ValueError(f"--instruction: the {spec.family if spec else 'source'!s} prompt has no instruction slot")
    if spec is None:
        return
    writer.add_string(FAMILY_KEY, spec.family)
    if spec.kind != "decoder":
        return
    template = spec.template.rerank_template(instruction if instruction is not None else spec.default_instruction)
    writer.add_string(RERANK_TEMPLATE_KEY, template)
    notes["rerank_template"] = template
    if rank_head:  # cls.output rows, then llama.cpp's softmax over them: p(first label)
        writer.add_pooling_type(gguf.PoolingType.RANK)
        writer.add_classifier_output_labels([label.strip() for label in spec.score.labels])
        writer.add_string(RELEVANCE_KEY, "probability")
        notes["rank_pooling"] = list(spec.score.labels)
        notes["relevance_score"] = "probability"
    elif logit_readout:  # no cls.output: n_cls_out stays 1, the rotated component 0
        writer.add_pooling_type(gguf.PoolingType.RANK)
        writer.add_string(RELEVANCE_KEY, "logit")
        notes["relevance_score"] = "logit"


# Keys _add_rerank_metadata writes afresh (a source converted before carries them too).
_REWRITTEN = (RERANK_TEMPLATE_KEY, RELEVANCE_KEY, FAMILY_KEY)
_REWRITTEN_ARCH = (".pooling_type", ".classifier.output_labels")  # after "{arch}"


def _copy_gguf_metadata(writer, src: Path, ftype, spec: ModelSpec | None) -> None:
    """The source's metadata, less what ``_add_rerank_metadata`` writes for ``spec``."""
    from gguf import GGUFReader, GGUFValueType

    decoder = spec is not None and spec.kind == "decoder"
    skip = _REWRITTEN if decoder else (FAMILY_KEY,) if spec is not None else ()

    reader = GGUFReader(str(src))
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        if key in skip or decoder and key.endswith(_REWRITTEN_ARCH):
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
