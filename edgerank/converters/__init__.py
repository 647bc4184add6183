"""Converters: a trained reranker -> 4-bit artifacts, verified against full precision.

``convert(src, to="gguf", quant="q4_k_m", out=...)`` or ``python -m edgerank.converters``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgerank.converters.output import OutputExistsError, atomic_path, check_output_location, size_on_disk, written_by_edgerank
from edgerank.errors import ModelFormatError, refuse_output_over_inputs
from edgerank.memory import PeakRSS

FORMATS = {"gguf": ("f16", "q8_0", "q4_0", "q4_1", "q4_k_m"), "onnx": ("int4", "int8", "fp32")}

__all__ = ["convert", "OutputExistsError", "FORMATS"]


def convert(src: str | Path, to: str, quant: str, out: str | Path, family: str | None = None,
            force: bool = False, verify: bool = True, progress: bool = True) -> dict:
    """Convert ``src`` (HF folder, .gguf, or built-in name) and return the conversion report.

    The output appears only when everything succeeded (written beside ``out`` and renamed
    into place); ``out`` is never overwritten unless ``force``. The report is also written
    as ``<out>.conversion_report.json``.
    """
    from edgerank.sources import resolve
    from edgerank.tokenization import HFTokenizer, label_token_ids

    if to not in FORMATS:
        raise ValueError(f"output format {to!r} is not available; choose from: {', '.join(FORMATS)}")
    if quant not in FORMATS[to]:
        raise ValueError(f"{to} quant {quant!r} not supported; choose from {', '.join(FORMATS[to])}")
    out = Path(out)
    report_path = out.with_name(out.name + ".conversion_report.json")
    refuse_output_over_inputs(out, src)
    if not force and (out.exists() or report_path.exists()):
        raise OutputExistsError(f"{out if out.exists() else report_path} exists; pass --force to replace it")
    for path in (out, report_path):  # checked before any work; atomic_path checks again at the end
        if (path.exists() or path.is_symlink()) and not written_by_edgerank(path):
            raise OutputExistsError(f"{path} exists and is not an edgerank artifact, GGUF or conversion report: "
                                    "--force only replaces what edgerank wrote; remove it yourself or choose "
                                    "another output")
    if out.exists() and out.is_dir() != (to == "onnx"):
        raise OutputExistsError(f"{out} is a {'folder' if out.is_dir() else 'file'}; a {to} conversion writes a "
                                f"{'folder' if to == 'onnx' else 'file'}: choose another output")
    check_output_location(out)
    source = resolve(src, family=family)
    refuse_output_over_inputs(out, source.path)  # a built-in name resolves into the cache
    if source.kind == "artifact":
        raise ModelFormatError(f"{src} is an edgerank artifact; convert from the HF folder or GGUF it came from")
    if to == "gguf" and source.spec.kind == "cross-encoder":
        raise ValueError(
            f"GGUF conversion covers decoder rerankers and bi-encoders; {source.path} is a cross-encoder, "
            "and llama.cpp has no BERT pooler+classifier head, so it would score it wrongly")
    if source.adapter is not None:
        raise ModelFormatError(
            f"{source.path} is a base model plus the LoRA adapter {source.adapter.name}; "
            "convert from the trained HF folder it came from")
    label_ids = None
    if to == "gguf" and source.kind == "hf" and source.spec.kind == "decoder":
        label_ids = label_token_ids(HFTokenizer.from_file(source.path / "tokenizer.json"), source.spec.score.labels)
    # a trained LoRA stays unmerged beside a quantized GGUF (see edgerank/converters/gguf_export.py)
    adapter_name = None
    if to == "gguf" and quant != "f16" and source.kind == "hf":
        from edgerank.adapters import adapter_file

        if adapter_file(source.path) is not None:
            adapter_name = f"{out.stem}.lora.gguf"
    t0 = time.perf_counter()
    with atomic_path(out, force=force, is_dir=(to == "onnx"), companions=(adapter_name,) if adapter_name else ()
                     ) as staging:
        with PeakRSS() as mem:
            if to == "gguf":
                from edgerank.converters.gguf_export import write_gguf

                notes = write_gguf(source.path, staging, quant, source.spec, label_ids, progress,
                                   adapter_dest=staging.with_name(adapter_name) if adapter_name else None)
            else:
                from edgerank.converters.onnx_export import write_artifact

                notes = write_artifact(source.path, staging, quant, source.spec, progress)
        report = {
            "source": str(source.path), "output": str(out), "format": to, "quant": quant,
            "family": source.spec.family, "architecture": source.architecture,
            "size_bytes": size_on_disk(staging) + (size_on_disk(staging.with_name(adapter_name)) if adapter_name else 0),
            "source_size_bytes": size_on_disk(source.path),
            "seconds": time.perf_counter() - t0, "peak_rss_mb": mem.peak_mb, **notes,
        }
        if verify:  # loads the full-precision source too: often longer than the conversion
            t1 = time.perf_counter()
            report.update(_verify(source, staging, to))
            report["verify_seconds"] = time.perf_counter() - t1
    tmp = report_path.with_name(f".{report_path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, report_path)
    return report


def _verify(source, converted: Path, to: str) -> dict:
    """Score sample pairs with the full-precision source and the converted model (unpruned).

    The source runs on the torch reference backend where the ``reference`` extra is
    installed; on the core install it runs as an fp32 artifact on ONNX Runtime (converted
    into a temporary folder), which equals transformers within 1e-3 (tests)."""
    import tempfile

    from edgerank import extras
    from edgerank.api import Reranker
    from edgerank.converters.verify import compare, sample_pairs

    if to == "gguf":
        extras.require("llamacpp", "verifying a GGUF conversion (or pass --no-verify)")
    pairs = sample_pairs()
    options = {"backend": "llamacpp"} if to == "gguf" else {"backend": "edgerank", "pruning": False}
    family = source.spec.family
    with tempfile.TemporaryDirectory(prefix="edgerank-verify-") as tmp:
        if extras.missing("reference"):
            reference = Path(tmp) / "fp32"
            convert(source.path, "onnx", "fp32", reference, family=family, verify=False, progress=False)
            ref_options = {"backend": "edgerank", "pruning": False}
        else:
            reference, ref_options = source.path, {"backend": "reference"}
        with Reranker(reference, family=family, **ref_options) as ref, \
                Reranker(converted, family=family, **options) as conv:
            return {**compare(ref, conv, pairs), "reference": ref_options["backend"]}
