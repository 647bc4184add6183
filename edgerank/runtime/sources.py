"""What a model on disk is: an edgerank artifact, a GGUF file or a Hugging Face folder, with its spec."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from edgerank.errors import (
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
    is_int,
)
from edgerank.runtime import layout
from edgerank.runtime.artifact import check_manifest
from edgerank.runtime.gguf_header import gguf_metadata
from edgerank.runtime.specs import SPECS, ModelSpec, get_spec

DECODER_ARCHS = {"llama", "qwen2", "qwen3"}
GGUF_ENCODER_ARCHS = {"bert"}  # mean-pooled embedding models (bi-encoders)
ENCODER_TYPES = {"bert", "xlm-roberta", "roberta"}
GGUF_MAGIC = b"GGUF"
# Set in a fine-tuned model's folder by edgerank's trainer, read back here.
FAMILY_FILE = "edgerank.json"
# edgerank's own GGUF keys (llama.cpp ignores them), written by edgerank/converters/gguf_export.py:
# the reranker family, and the LoRA adapter file that must sit beside the model.
FAMILY_KEY = "edgerank.family"
LORA_KEY = "edgerank.lora_adapter"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are and how to score with it."""

    kind: Literal["hf", "gguf", "artifact"]
    path: Path
    spec: ModelSpec
    name: str
    architecture: str
    adapter: Path | None = None  # a GGUF's LoRA adapter file (llama.cpp applies it at run time)
    # Longest sequence the model can embed: its learned position table (BERT-style
    # encoders). None for rotary decoders, which have no hard limit.
    max_positions: int | None = None


def source_at(path: str | Path, family: str | None = None, name: str | None = None) -> ModelSource:
    """What the model at ``path`` is (an edgerank artifact, a GGUF file or a Hugging Face
    folder) and how to score with it; ``family`` overrides spec detection, ``name`` is what
    the caller called it (default: the path). Names of built-in models and ``hf:`` ids are
    :func:`edgerank.models.supply.resolve`'s."""
    path = Path(path).expanduser()
    name = str(path) if name is None else name
    if not path.exists():
        raise ModelNotFoundError(f"no model at {str(path)!r}: no such file or folder")
    if path.is_file():
        return _gguf_source(path, name, family)
    if (path / layout.MANIFEST).is_file():
        manifest = _read_json(path / layout.MANIFEST)
        check_manifest(path, manifest)
        if family is None and manifest.get("family") not in SPECS:
            raise ModelFormatError(f"{path}: manifest.json names no known reranker family "
                                   f"({manifest.get('family')!r}); pass family=")
        spec = get_spec(family or manifest["family"])
        spec = spec.with_max_length(int(manifest.get("max_length") or spec.max_length))
        arch, dims = manifest.get("architecture", "?"), manifest.get("dims") or {}
        positions = None
        if arch in ENCODER_TYPES and dims.get("context_length"):
            positions = int(dims["context_length"]) - int(dims.get("position_offset", 0))
        return _limited(ModelSource("artifact", path, spec, name, arch), positions)
    if (path / "config.json").is_file():
        return _hf_source(path, name, family)
    raise ModelFormatError(
        f"{str(path)!r} is a folder but not a model: it has neither config.json (a Hugging Face "
        "model) nor manifest.json (an edgerank artifact)"
    )


def _limited(source: ModelSource, positions: int | None) -> ModelSource:
    """``source`` with its position limit, and its default max_length kept within it."""
    if not positions:
        return source
    spec = source.spec.with_max_length(min(source.spec.max_length, int(positions)))
    return replace(source, spec=spec, max_positions=int(positions))


def check_max_length(source: ModelSource, max_length: int | None) -> None:
    """Refuse a ``max_length`` that is not a positive int, or that is longer than
    ``source``'s position table (a BERT-style model cannot embed more positions)."""
    if max_length is None:
        return
    if not is_int(max_length) or max_length < 1:
        raise ValueError(f"max_length must be a positive int or None (got {max_length!r})")
    if source.max_positions is not None and max_length > source.max_positions:
        raise ValueError(f"max_length={max_length} is longer than {source.name} can read: its "
                         f"position table has {source.max_positions} positions")


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else (a list, ``null``) is a ModelFormatError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _field(path: Path, data: dict, key: str, kind: type | tuple, default=None):
    """``data[key]`` if it is of ``kind`` (``default`` when absent or null), else a ModelFormatError."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ModelFormatError(f"{path}: {key!r} has the wrong type ({type(value).__name__}: {value!r:.80})")
    return value


def _gguf_source(path: Path, name: str, family: str | None) -> ModelSource:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFormatError(
                f"{str(path)!r} is not a model: a model file must be GGUF (it starts with "
                "'GGUF'); a Hugging Face model is given as its folder"
            )
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture", "?")
    if arch in GGUF_ENCODER_ARCHS:
        spec = get_spec(family or "bi-encoder")
        return _limited(ModelSource("gguf", path, spec, name, arch), meta.get(f"{arch}.context_length"))
    if arch not in DECODER_ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; edgerank runs {', '.join(sorted(DECODER_ARCHS))} "
            f"decoders and {', '.join(sorted(GGUF_ENCODER_ARCHS))} embedding models from GGUF"
        )
    adapter = None
    if LORA_KEY in meta:
        if Path(meta[LORA_KEY]).name != meta[LORA_KEY]:
            raise ModelFormatError(f"{str(path)!r}: {LORA_KEY} must be a file name, not {meta[LORA_KEY]!r}")
        adapter = path.parent / meta[LORA_KEY]
        if not adapter.is_file():
            raise ModelFormatError(
                f"{str(path)!r} holds base weights whose fine-tuned update is the LoRA adapter "
                f"{meta[LORA_KEY]!r}, which must sit beside it: {str(adapter)!r} is missing")
    family = family or meta.get(FAMILY_KEY)
    if family is None:
        pooling = meta.get(f"{arch}.pooling_type")
        label = str(meta.get("general.name", "")).lower()
        if pooling == 4 or "reranker" in label:  # 4 = LLAMA_POOLING_TYPE_RANK
            family = "qwen3-reranker"
        elif "<|im_start|>" in str(meta.get("tokenizer.chat_template", "")):
            family = "zeroshot-chatml"
        else:
            raise UnsupportedModelError(
                f"cannot tell which reranker family {str(path)!r} is; pass family= "
                "(qwen3-reranker, rank1, interank, zeroshot-chatml)"
            )
    return ModelSource("gguf", path, get_spec(family), name, arch, adapter)


def _hf_source(path: Path, name: str, family: str | None) -> ModelSource:
    cfg_path = path / "config.json"
    config = _read_json(cfg_path)
    model_type = _field(cfg_path, config, "model_type", str, "?")
    archs = _field(cfg_path, config, "architectures", list, [])
    if not all(isinstance(a, str) for a in archs):
        raise ModelFormatError(f"{cfg_path}: 'architectures' must be a list of class names")
    if family is None and (path / FAMILY_FILE).is_file():
        family = _field(path / FAMILY_FILE, _read_json(path / FAMILY_FILE), "family", str)
        if family is not None and family not in SPECS:
            raise ModelFormatError(f"{path / FAMILY_FILE} names an unknown reranker family {family!r}")
    if model_type in ENCODER_TYPES:
        if family is None:
            cls = any(a.endswith("ForSequenceClassification") for a in archs)
            family = "cross-encoder" if cls else "bi-encoder"
        spec = get_spec(family)
        st_config = path / "sentence_bert_config.json"
        if spec.kind == "bi-encoder" and st_config.is_file():
            length = _field(st_config, _read_json(st_config), "max_seq_length", int, spec.max_length)
            if length < 1:
                raise ModelFormatError(f"{st_config}: max_seq_length must be positive (got {length})")
            spec = spec.with_max_length(length)
        positions = _field(cfg_path, config, "max_position_embeddings", int)
        if positions and model_type in ("roberta", "xlm-roberta"):  # positions start after the pad id
            positions -= _field(cfg_path, config, "pad_token_id", int, 1) + 1
        if positions is not None and positions < 1:
            raise ModelFormatError(f"{cfg_path}: max_position_embeddings leaves no position")
        return _limited(ModelSource("hf", path, spec, name, model_type), positions)
    if model_type in DECODER_ARCHS:
        if family is None:
            hint = f"{config.get('_name_or_path') or ''} {path.name}".lower()
            tok_cfg = path / "tokenizer_config.json"
            chat = str(_read_json(tok_cfg).get("chat_template", "")) if tok_cfg.is_file() else ""
            if "reranker" in hint:
                family = "qwen3-reranker"
            elif "rank1" in hint:
                family = "rank1"
            elif "interank" in hint:
                family = "interank"
            elif "<|im_start|>" in chat:
                family = "zeroshot-chatml"
            else:
                raise UnsupportedModelError(
                    f"cannot tell which reranker family {str(path)!r} is; pass family= "
                    "(qwen3-reranker, rank1, interank, zeroshot-chatml)"
                )
        return ModelSource("hf", path, get_spec(family), name, model_type)
    raise UnsupportedModelError(
        f"model type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not supported; "
        f"edgerank runs {', '.join(sorted(DECODER_ARCHS | ENCODER_TYPES))}"
    )
