"""Hugging Face folders from trained weights: a model saved from the reference path, and a
base model with a LoRA adapter merged into it exactly (how edgerank's own models are
rebuilt from their base and adapter when pulled)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgerank.converters.adapters import (
    ADAPTER_FILE,
    merge_lora,
    read_adapter,
    state_digest,
)
from edgerank.runtime.layout import sha256_file
from edgerank.runtime.sources import FAMILY_FILE, ModelSource


def save_model(backend, family: str, folder: Path, extra: dict | None = None) -> str:
    """Save ``backend``'s model + tokenizer as an HF folder tagged with ``family``;
    returns the weights' :func:`edgerank.converters.adapters.state_digest`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = backend.full_model.to("cpu")
    state = model.state_dict()
    # Written by hand, not save_pretrained: transformers refuses to save a model it loaded
    # from GGUF (it counts as "quantized"), although the weights are plain fp32 by now.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    head = model.get_output_embeddings() if config.get("tie_word_embeddings") else None
    out_key = next((k for k, v in state.items() if v.data_ptr() == head.weight.data_ptr()
                    and k.startswith(("lm_head", "output"))), None) if head is not None else None
    tensors = {k: v.contiguous().clone() for k, v in state.items() if k != out_key}  # tied: stored once
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    backend.hf_tokenizer.save_pretrained(folder)
    digest = state_digest(state)
    (folder / FAMILY_FILE).write_text(json.dumps({"family": family, "weights_sha256": digest, **(extra or {})}, indent=2))
    return digest


def export_merged(base: ModelSource, adapter: Path, folder: Path, base_backend=None) -> str:
    """Load ``base``, merge ``adapter`` into it exactly, save it into ``folder`` (in
    ``base``'s family). ``base_backend``: ``base`` already loaded on the reference path
    (merged into, then closed)."""
    from edgerank.runtime.backends.reference import ReferenceBackend

    _, meta = read_adapter(adapter)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / ADAPTER_FILE).resolve() != Path(adapter).resolve():
        shutil.copyfile(adapter, folder / ADAPTER_FILE)  # the converters keep it unmerged
    backend = base_backend or ReferenceBackend(base, device="cpu")
    try:
        backend.full_model.load_state_dict(merge_lora(backend.full_model.state_dict(), adapter))
        return save_model(backend, base.spec.family, folder, {"base": base.name, "adapter_sha256": sha256_file(adapter),
                                                     "lora_r": int(meta["r"]), "lora_alpha": int(meta["alpha"])})
    finally:
        backend.close()
