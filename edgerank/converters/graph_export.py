"""HF folder -> the whole model as one standard ONNX graph (``--to onnx-graph``).

What a user would build instead of edgerank: ``torch.onnx.export`` of the model with its
scoring head, optionally ``onnxruntime.quantization.quantize_dynamic`` (int8) on top. Any
ONNX runtime runs it; the bench runs it as the ``ort-fp32-graph`` and ``ort-int8-graph``
peers (``edgerank.bench.peers``). Layout::

    manifest.json   format "edgerank-graph", family, kind, padding side, sha256 per file
    model.onnx      inputs input_ids, attention_mask [, token_type_ids] [B, T] int64;
                    output head [B, W]: the answer-label logits at the last token
                    (decoders, left-padded), the classifier logits (cross-encoders), the
                    mean-pooled embedding (bi-encoders); ``ScoreFormula.apply`` scores them
    tokenizer.json
"""

from __future__ import annotations

import json
from pathlib import Path

from edgerank.runtime import layout
from edgerank.errors import ModelFormatError
from edgerank.runtime.layout import GRAPH_FORMAT, sha256_file
from edgerank.runtime.sources import ModelSource

GRAPH_FILE = "model.onnx"
QUANTS = ("fp32", "int8")


def write_graph(source: ModelSource, dest: Path, quant: str) -> dict:
    """Export ``source`` (an HF folder, or a GGUF file, dequantized to fp32 as the reference
    backend reads it) into the folder ``dest`` (new or empty)."""
    import torch

    from edgerank.runtime.backends.reference import ReferenceBackend

    from edgerank.converters.onnx_export import write_tokenizer

    src, spec = source.path, source.spec
    if quant not in QUANTS:
        raise ValueError(f"onnx-graph quant {quant!r} not supported; choose from {', '.join(QUANTS)}")
    if source.kind not in ("hf", "gguf"):
        raise ModelFormatError(f"{src}: an onnx-graph export reads an HF folder or a GGUF file")
    dest.mkdir(parents=True, exist_ok=True)
    ref = ReferenceBackend(source, device="cpu")
    module = _scorer(ref).eval()
    types = spec.kind != "decoder" and getattr(ref.model.config, "type_vocab_size", 1) > 1
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])
    example = tuple(torch.ones((2, 8), dtype=torch.long) for _ in names)
    fp32 = dest / (GRAPH_FILE if quant == "fp32" else "model.fp32.onnx")
    with torch.inference_mode():
        torch.onnx.export(module, example, str(fp32), input_names=names, output_names=["head"], opset_version=17,
                          dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names}, "head": {0: "batch"}},
                          dynamo=False)
    if quant == "int8":  # what ORT's docs tell a user to do for CPU
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(dest / GRAPH_FILE), weight_type=QuantType.QInt8)
        fp32.unlink()
    write_tokenizer(src, dest / layout.TOKENIZER)
    files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(dest.iterdir())}
    manifest = {"format": GRAPH_FORMAT, "family": spec.family, "kind": spec.kind, "quant": quant,
                "padding": "left" if spec.kind == "decoder" else "right", "inputs": names, "files": files,
                "source": str(src)}
    (dest / layout.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {"graph_inputs": names}


def _scorer(ref):
    """The reference model and its head as one ``torch.nn.Module`` (defined here: torch is
    imported only when exporting)."""
    import torch

    class Scorer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.kind = ref.model, ref.spec.kind
            self.normalize = bool(getattr(ref.spec, "normalize", False))
            if self.kind == "decoder":
                self.register_buffer("rows", ref.head_weight)
                self.register_buffer("bias", ref.head_bias if ref.head_bias is not None
                                     else torch.zeros(len(ref.head_weight)))

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            if self.kind == "decoder":  # left padding: every sequence ends at -1
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids)
                return out.last_hidden_state[:, -1] @ self.rows.T + self.bias
            kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if self.kind == "cross-encoder":
                return out.logits
            m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    return Scorer()
