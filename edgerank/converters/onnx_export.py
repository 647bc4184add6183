"""HF folder or GGUF file -> the edgerank artifact (a folder the layer-wise runtime loads).

Layout (``FORMAT_VERSION`` 1)::

    manifest.json        spec family, architecture and dimensions, quantisation, sha256 per file
    tokenizer.json
    embed.npy            token embeddings, [vocab, hidden]: int8 rows (int4/int8 artifacts) or fp32
    embed_scale.npy      per-row fp32 scales of the int8 rows
    lm_head.npy          untied decoders only: the full LM head, stored as the embedding is (explanations)
    lm_head_scale.npy    its per-row fp32 scales (int4/int8 artifacts)
    head.npz             final norm + answer-label rows of the LM head (decoders); pooler and
                         classifier (cross-encoders); embedding LayerNorm, positions, token types (BERT)
    layers/layer_NN.onnx one graph per layer (edgerank/converters/onnx_graphs.py); MatMulNBits int4/int8
                         weights, or plain fp32 MatMul

The embedding table is a plain ``.npy`` so the runtime memory-maps it and reads single
rows. Everything is read one layer at a time: peak memory is one layer in fp32 plus the
embedding table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from edgerank.converters.onnx_graphs import ACCURACY_LEVEL, INT8, decoder_layer, encoder_layer
from edgerank.converters.smoothing import ALPHA, Calibration, calibration_tokens, smooth
from edgerank.converters.static_int8 import STATIC_FORM, StaticForm, calibration_sequences
from edgerank.converters.tensors import ArchConfig, TensorReader
from edgerank.runtime import layout
from edgerank.runtime.compute import static_runs_here
from edgerank.runtime.extras import can_quantize_static
from edgerank.runtime.layout import FORMAT, FORMAT_VERSION, sha256_file
from edgerank.errors import ModelFormatError, UnsupportedModelError
from edgerank.runtime.specs import ModelSpec

QUANTS = ("int4", "int8", "fp32")
# forms stored beside the artifact's own, for the runtime to choose from (``edgerank.runtime.compute``):
# an int4 artifact carries int8-compute layers too (the faster form where memory allows), and
# an int4 encoder its int8-static layers where NNCF is installed (converters/static_int8.py)
INT8_FORM = "int8"
EXTRA_FORMS = {"int4": (INT8_FORM,), "int8": (), "fp32": ()}
BLOCK_SIZE = 32
EMBED_ROWS_PER_STEP = 8192


def write_artifact(src: Path, dest: Path, quant: str, spec: ModelSpec, progress: bool = True) -> dict:
    """Convert ``src`` into the artifact folder ``dest`` (new or empty)."""
    if quant not in QUANTS:
        raise ValueError(f"onnx quant {quant!r} not supported; choose from {', '.join(QUANTS)}")
    reader = TensorReader(src)
    cfg = reader.config
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    (dest / layout.LAYERS_DIR).mkdir()
    tokenizer = write_tokenizer(src, dest / layout.TOKENIZER)
    encoder = cfg.arch in ("bert", "xlm-roberta")
    prefix = _encoder_prefix(reader) if encoder else "model."
    if encoder and spec.kind == "decoder" or not encoder and spec.kind != "decoder":
        raise UnsupportedModelError(f"family {spec.family!r} ({spec.kind}) does not fit a {cfg.arch} model")
    notes: dict = {"fallbacks": {}}
    embed_name = prefix + ("embeddings.word_embeddings.weight" if encoder else "embed_tokens.weight")
    table = reader.get(embed_name)
    _write_embedding(table, dest, quant)
    lora = _adapter_tensors(src) if quant != "fp32" else {}
    # an unmerged LoRA update stays fp32 in the other forms; NNCF would round it into int8 weights
    static = encoder and quant == "int4" and not lora and can_quantize_static() and static_runs_here()
    extra = EXTRA_FORMS[quant] + ((STATIC_FORM,) if static else ())
    head = _encoder_head(reader, prefix, spec) if encoder else None  # a decoder's after the table goes
    # a decoder's int8 form is smoothed (converters/smoothing.py), from activations of calibration
    # pairs; an encoder's int8-static form is quantized on them (converters/static_int8.py)
    calibration = None
    if INT8_FORM in (quant, *extra) and not encoder:
        calibration = _calibration(cfg, spec, tokenizer, table)
    elif STATIC_FORM in extra:
        from edgerank.converters.sample import SAMPLE

        offset = cfg.pad_token_id + 1 if cfg.arch == "xlm-roberta" else 0
        calibration = StaticForm(dest, calibration_sequences(tokenizer, spec, SAMPLE), table, head, offset,
                                 cfg.norm_eps)
    del table
    if not encoder and "lm_head.weight" in reader:  # untied: generation needs the whole LM head
        _write_embedding(reader.get("lm_head.weight"), dest, quant, layout.LM_HEAD, layout.LM_HEAD_SCALE)
    np.savez(dest / layout.HEAD, **(head if encoder else _decoder_head(reader, cfg, spec, tokenizer)))
    layer_prefix = prefix + ("encoder.layer." if encoder else "layers.")
    if lora:
        notes["lora"] = f"{len(lora) // 2} projections keep their LoRA update unmerged, in fp32"
    if isinstance(calibration, Calibration):
        notes["smoothing"] = f"int8 form smoothed (alpha {ALPHA}) on {len(calibration.valid)} calibration pairs"
    _write_layers(reader, cfg, dest, quant, extra, layer_prefix, lora, calibration, notes, progress)
    manifest = _manifest(cfg, spec, quant, extra, src, dest)
    (dest / layout.MANIFEST).write_text(json.dumps(manifest, indent=1))
    notes["compute"] = _check_forms(dest, manifest, spec, quant)
    notes["format_version"] = FORMAT_VERSION
    return notes


def _write_layers(reader: TensorReader, cfg: ArchConfig, dest: Path, quant: str, extra: tuple, layer_prefix: str,
                  lora: dict, calibration: Calibration | StaticForm | None, notes: dict,
                  progress: bool) -> None:
    """Each layer's graph in the artifact's own format and in each ``extra`` form, one layer's
    weights in memory at a time."""
    encoder = cfg.arch in ("bert", "xlm-roberta")
    for i in tqdm(range(cfg.n_layers), desc=f"ONNX {quant} layers", unit="layer", disable=not progress):
        p = f"{layer_prefix}{i}."
        w = {n[len(p):]: reader.get(n) for n in reader.names() if n.startswith(p)}
        w.update({n[len(p):]: t for n, t in lora.items() if n.startswith(p)})
        dec = dict(hidden=cfg.hidden, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                   eps=cfg.norm_eps, qk_norm="self_attn.q_norm.weight" in w, name=f"layer_{i}", block=BLOCK_SIZE)
        maxima = None
        if isinstance(calibration, Calibration):
            maxima = calibration.run(decoder_layer(w, taps=True, **dec), cfg.n_kv_heads, cfg.head_dim)
        for form in (None, *extra):
            if form == STATIC_FORM:  # the fp32 graph, quantized by NNCF on this layer's inputs (below)
                calibration.add(encoder_layer(w, hidden=cfg.hidden, n_heads=cfg.n_heads, eps=cfg.norm_eps,
                                              name=f"layer_{i}"), layout.layer_file(i, form))
                continue
            if encoder:
                model = encoder_layer(w, hidden=cfg.hidden, n_heads=cfg.n_heads, eps=cfg.norm_eps, name=f"layer_{i}",
                                      bits=_bits_picker(reader, form or quant, p, notes), block=BLOCK_SIZE)
            else:
                lw = smooth(w, maxima, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) if (form or quant) == INT8_FORM else w
                model = decoder_layer(lw, bits=_bits_picker(reader, form or quant, p, notes), **dec)
            onnx.save_model(model, dest / layout.layer_file(i, form))
            del model
        del w
    if isinstance(calibration, StaticForm):
        calibration.write()


def _check_forms(dest: Path, manifest: dict, spec: ModelSpec, quant: str) -> dict:
    """Whether each form other than the own one that runs here (the stored extra forms, and
    ``bf16`` on OpenVINO where it runs) ranks like the own one (``compute.fit``), and which
    form is fastest on this CPU (``compute.measured``): written into the manifest; returns both."""
    from edgerank.converters.verify import form_fit
    from edgerank.runtime.artifact import Artifact
    from edgerank.runtime.compute import measure_forms, runnable
    from edgerank.runtime.cpu import default_threads

    artifact = Artifact(dest, manifest, verified=False)
    others = [form for form in runnable(artifact) if form != quant]
    if not others:
        return {}
    manifest["compute"]["fit"] = {form: form_fit(dest, spec.family, quant, form) for form in others}
    manifest["compute"]["measured"] = measured = measure_forms(artifact, default_threads())
    (dest / layout.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {**measured, "fit": manifest["compute"]["fit"]}


def _calibration(cfg: ArchConfig, spec: ModelSpec, tokenizer, table: np.ndarray) -> Calibration:
    """The calibration pairs' layer-0 hidden states (fp32 embedding rows) and positions."""
    from edgerank.converters.sample import SAMPLE
    from edgerank.runtime.rope import RopeTable

    return Calibration(calibration_tokens(tokenizer, spec, SAMPLE), table,
                       RopeTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))


def _adapter_tensors(src: Path) -> dict[str, np.ndarray]:
    """The LoRA adapter a trained folder carries (``adapter.safetensors``, written by
    ``edgerank.train.trainer``), as ``{weight key}.lora_A`` / ``.lora_B`` with B scaled by alpha/r."""
    from edgerank.converters.adapters import adapter_file, lora_updates

    path = adapter_file(src)
    if path is None:
        return {}
    out = {}
    for key, (a, b) in lora_updates(path).items():
        out[key + ".lora_A"], out[key + ".lora_B"] = a, b
    return out


def _encoder_prefix(reader: TensorReader) -> str:
    for name in reader.names():
        if name.endswith("embeddings.word_embeddings.weight"):
            return name[: -len("embeddings.word_embeddings.weight")]
    raise ModelFormatError(f"{reader.src}: no embeddings.word_embeddings.weight tensor")


def write_tokenizer(src: Path, dest: Path):
    """Copy (HF folder) or rebuild (GGUF, via transformers) ``tokenizer.json``."""
    from edgerank.runtime.tokenization import HFTokenizer

    if src.is_dir():
        if not (src / layout.TOKENIZER).is_file():
            raise ModelFormatError(f"{src} has no tokenizer.json: the artifact needs a fast tokenizer")
        shutil.copyfile(src / layout.TOKENIZER, dest)
    else:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        tok.backend_tokenizer.save(str(dest))
    return HFTokenizer.from_file(dest)


def _write_embedding(table: np.ndarray, dest: Path, quant: str, name: str = layout.EMBED,
                     scale_name: str = layout.EMBED_SCALE) -> None:
    """fp32 rows, or int8 rows with one absmax scale per row (read row by row at run time)."""
    if quant == "fp32":
        np.save(dest / name, table.astype(np.float32, copy=False))
        return
    out = np.lib.format.open_memmap(dest / name, mode="w+", dtype=np.int8, shape=table.shape)
    scales = np.empty(table.shape[0], dtype=np.float32)
    for start in range(0, table.shape[0], EMBED_ROWS_PER_STEP):
        rows = table[start: start + EMBED_ROWS_PER_STEP]
        s = np.abs(rows).max(axis=1) / 127.0
        s[s == 0] = 1.0
        out[start: start + len(rows)] = np.clip(np.rint(rows / s[:, None]), -127, 127).astype(np.int8)
        scales[start: start + len(rows)] = s
    out.flush()
    del out
    np.save(dest / scale_name, scales)


def _decoder_head(reader: TensorReader, cfg: ArchConfig, spec: ModelSpec, tokenizer) -> dict:
    from edgerank.runtime.tokenization import label_token_ids

    ids = label_token_ids(tokenizer, spec.score.labels)
    lm = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"
    return {"norm": reader.get("model.norm.weight"), "rows": reader.get(lm)[ids].astype(np.float32),
            "label_ids": np.array(ids, dtype=np.int64)}


def _encoder_head(reader: TensorReader, prefix: str, spec: ModelSpec) -> dict:
    e = prefix + "embeddings."
    head = {"position": reader.get(e + "position_embeddings.weight"),
            "ln_weight": reader.get(e + "LayerNorm.weight"), "ln_bias": reader.get(e + "LayerNorm.bias")}
    if e + "token_type_embeddings.weight" in reader:
        head["token_type"] = reader.get(e + "token_type_embeddings.weight")
    if spec.kind == "cross-encoder":
        # BERT: pooler.dense + classifier; RoBERTa/XLM-R: classifier.dense + classifier.out_proj
        pairs = [(prefix + "pooler.dense", "classifier"), ("classifier.dense", "classifier.out_proj")]
        for pool, cls in pairs:
            if pool + ".weight" in reader and cls + ".weight" in reader:
                for key, name in (("pool", pool), ("cls", cls)):
                    head[key + "_weight"] = reader.get(name + ".weight")
                    head[key + "_bias"] = reader.get(name + ".bias")
                break
        else:
            raise ModelFormatError(f"{reader.src}: a cross-encoder needs its pooler and classifier weights")
    return head


# Projections the int4 form stores at 8 bits: a BERT-style encoder's FFN up-projection. On
# minilm-l6 it cost the int4 form most of its distance from fp32 (DL19, 43 queries, depth 100:
# nDCG@10 0.6348 all 4-bit, 0.6404 with it at 8 bits, against fp32's 0.6424), for 18% more
# layer bytes; the FFN's down-projection gave 0.6385, attention's output 0.6382, Q/K/V 0.6392
# (bench/history/quality.md §22).
INT4_KEPT_AT_8 = ("intermediate.dense",)


def _bits_picker(reader: TensorReader, quant: str, layer_prefix: str, notes: dict):
    """Storage of each projection: the artifact's quant, except that the int4 form keeps
    :data:`INT4_KEPT_AT_8` at 8 bits, and a 4-bit GGUF source's tensors kept at 6 bits or
    more (Q4_K_M keeps some at Q6_K or Q8_0) stay at int8, as a reported fallback. 5-bit
    tensors (Q5_0, Q5_K: llama.cpp's fallback when a row does not fit a K-quant
    super-block) become int4 like the rest."""
    base = {"int4": 4, "int8": INT8, "fp32": None}[quant]
    mixed = base == 4 and reader.has_4bit

    def pick(proj: str) -> int | None:
        if base == 4 and proj in INT4_KEPT_AT_8:
            return 8
        t = reader.source_type(layer_prefix + proj + ".weight") if mixed else None
        if t is not None and not t.startswith(("Q4", "IQ4", "Q5", "Q2", "Q3", "IQ2", "IQ3")):
            notes["fallbacks"][layer_prefix + proj] = f"kept at int8: the source stores it as {t}"
            return 8
        return base
    return pick


FORM_OPS = {
    "int4": {"op": "MatMulNBits", "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL,
             "scheme": "affine min-max per block, fp32 scale and zero point (Q4_1's grid)"},
    "int8": {"op": "MatMulIntegerToFloat", "block_size": None, "accuracy_level": None,
             "scheme": "symmetric absmax per output channel (7-bit codes); activations quantized to uint8 per token"},
    "fp32": {"op": "MatMul", "block_size": None, "accuracy_level": None, "scheme": "none"},
    STATIC_FORM: {"op": "QuantizeLinear/DequantizeLinear", "block_size": None, "accuracy_level": None,
                  "scheme": "NNCF post-training quantization (transformer preset): int8 weights per output channel, "
                            "int8 activations with scales calibrated on the built-in sample",
                  "engine": "openvino"},
}


def _manifest(cfg: ArchConfig, spec: ModelSpec, quant: str, extra: tuple, src: Path, dest: Path) -> dict:
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    dims = {k: getattr(cfg, k) for k in ("n_layers", "hidden", "ffn", "n_heads", "n_kv_heads", "head_dim",
                                         "vocab_size", "context_length", "rope_theta", "norm_eps")}
    if cfg.arch in ("bert", "xlm-roberta"):
        dims["position_offset"] = cfg.pad_token_id + 1 if cfg.arch == "xlm-roberta" else 0
        dims["type_vocab_size"] = cfg.type_vocab_size
    else:
        dims["rope_scaling"] = cfg.rope_scaling
        dims["tied_embeddings"] = not (dest / layout.LM_HEAD).is_file()  # the LM head is the embedding table
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": spec.family,
        "kind": spec.kind,
        "max_length": spec.max_length,
        "architecture": cfg.arch,
        "dims": dims,
        "quant": {"weights": quant, **FORM_OPS[quant],
                  "embedding": "fp32" if quant == "fp32" else "int8 per-row absmax"},
        "layers": [layout.layer_file(i) for i in range(cfg.n_layers)],
        "layer_inputs": list(layout.ENCODER_INPUTS if cfg.arch in ("bert", "xlm-roberta") else layout.DECODER_INPUTS),
        "compute": {"forms": {form: [layout.layer_file(i, form) for i in range(cfg.n_layers)]
                              for form in extra},
                    "ops": {form: FORM_OPS[form] for form in (quant, *extra)}},
        "files": {str(p.relative_to(dest)): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files},
        "source": str(src),
        "pruning": {"threshold": None, "calibrated": False},
    }
