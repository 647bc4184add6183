"""Converters: a trained reranker -> 4-bit artifacts, verified against full precision.

``convert(src, to="gguf", quant="q4_k_m", out=...)`` or ``python -m edgerank.converters``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgerank.cli import check_output, write_atomic
from edgerank.converters.output import (
    OutputExistsError,
    atomic_path,
    claim,
    size_on_disk,
    written_by_edgerank,
)
from edgerank.errors import ModelFormatError
from edgerank.runtime import layout
from edgerank.runtime.memory import PeakRSS
from edgerank.runtime.sources import ModelSource, source_at

FORMATS = {"gguf": ("f16", "q8_0", "q4_0", "q4_1", "q4_k_m"), "onnx": ("int4", "int8", "fp32"),
           "onnx-graph": ("fp32", "int8")}  # the last: the whole model as one standard graph (a peer's form)
FOLDERS = ("onnx", "onnx-graph")  # formats written as a folder

__all__ = ["convert", "check_request", "OutputExistsError", "FORMATS"]


# A GGUF source's dominant weight type -> the GGUF quant that keeps those weights as they are.
SOURCE_GRIDS = {"F16": "f16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k_m"}
FOUR_BIT = ("q4_0", "q4_1", "q4_k_m")


def source_quant(path: Path) -> str | None:
    """The storage type of most of a GGUF's weight matrices (``Q4_1``...), None if not quantised."""
    from collections import Counter

    from gguf import GGUFReader

    types = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors
                    if len(t.shape) == 2 and t.name.startswith("blk."))
    name = types.most_common(1)[0][0] if types else None
    return None if name in (None, "F32", "BF16") else name


def check_request(src: str | Path, to: str, quant: str | None, out: str | Path, force: bool = False,
                  instruction: str | None = None) -> None:
    """Everything about a conversion that can be refused before its source is read (or a
    built-in pulled): the format and quant, and an output that exists, is not edgerank's,
    is an input or cannot be written."""
    if to not in FORMATS:
        raise ValueError(f"output format {to!r} is not available; choose from: {', '.join(FORMATS)}")
    if quant is not None and quant not in FORMATS[to]:
        raise ValueError(f"{to} quant {quant!r} not supported; choose from {', '.join(FORMATS[to])}")
    if instruction is not None and to != "gguf":
        raise ValueError("--instruction fills the rerank template of a GGUF; an ONNX artifact takes it at rank time")
    out = Path(out)
    report_path = _report_path(out)
    check_output(out, src, folder=True, parents=True)  # a file where a folder goes, or the reverse: below
    if not force and (out.exists() or report_path.exists()):
        raise OutputExistsError(f"{out if out.exists() else report_path} exists; pass --force to replace it")
    for path in (out, report_path):  # checked before any work; atomic_path checks again at the end
        if (path.exists() or path.is_symlink()) and not written_by_edgerank(path):
            raise OutputExistsError(f"{path} exists and is not an edgerank artifact, GGUF or conversion report: "
                                    "--force only replaces what edgerank wrote; remove it yourself or choose "
                                    "another output")
    if out.exists() and out.is_dir() != (to in FOLDERS):
        raise OutputExistsError(f"{out} is a {'folder' if out.is_dir() else 'file'}; a {to} conversion writes a "
                                f"{'folder' if to in FOLDERS else 'file'}: choose another output")


def convert(src: str | Path | ModelSource, to: str, quant: str | None, out: str | Path, family: str | None = None,
            force: bool = False, verify: bool = True, progress: bool = True, instruction: str | None = None,
            rank_readout: bool | None = None) -> dict:
    """Convert ``src`` (an HF folder or a .gguf path, or a resolved :class:`ModelSource`:
    ``edgerank.models.supply.resolve`` reads built-in names) and return the conversion report.

    ``quant`` None picks the default: for a GGUF source already quantised, the grid that
    keeps its weights (a Q4_1 source stays Q4_1); otherwise ``q4_k_m`` (gguf) or ``int4``.
    Asking for another 4-bit grid than a 4-bit source's re-rounds every weight: the report's
    ``warnings`` say so. ``instruction`` fills the rerank template written into a GGUF
    (default: the family's). ``rank_readout`` rotates a llama/qwen2 yes/no reranker so that
    llama-server's rank pooling returns its logit (``gguf_export.RankReadout``); None (the
    default) does so unless the source is a quantised GGUF and the output 4-bit, where the
    rotation would re-round weights that sit on their grid (the report then says so).
    The output appears only when everything succeeded (written beside ``out`` and renamed
    into place); ``out`` is never overwritten unless ``force``. The report is also written
    as ``<out>.conversion_report.json``.
    """
    out = Path(out)
    check_request(src.path if isinstance(src, ModelSource) else src, to, quant, out, force, instruction)
    source = _source(src, family, to)
    grid = source_quant(source.path) if source.kind == "gguf" else None
    quant, warnings = _quant(to, quant, grid)
    if rank_readout is None:
        rank_readout = not (grid is not None and quant in FOUR_BIT)
    adapter_name = _adapter_name(source, to, quant, out)
    with claim(out):  # held until the report is written too: a second conversion to ``out`` refuses
        report = _write_claimed(source, to, quant, out, force, verify, progress, instruction, rank_readout,
                                adapter_name)
        report.update({"source_quant": grid, **({"warnings": warnings} if warnings else {})})
        write_atomic(_report_path(out), json.dumps(report, indent=1))
    return report


def _write_claimed(source: ModelSource, to: str, quant: str, out: Path, force: bool, verify: bool, progress: bool,
                   instruction: str | None, rank_readout: bool, adapter_name: str | None) -> dict:
    """Write (and verify) the conversion into place; its report."""
    t0 = time.perf_counter()
    with atomic_path(out, force=force, is_dir=(to in FOLDERS), companions=(adapter_name,) if adapter_name else ()
                     ) as staging:
        with PeakRSS() as mem:
            notes = _write(source, staging, to, quant, progress, instruction, rank_readout, adapter_name)
        report = {
            "source": str(source.path), "output": str(out), "format": to, "quant": quant,
            "family": source.spec.family, "architecture": source.architecture,
            "size_bytes": size_on_disk(staging) + (size_on_disk(staging.with_name(adapter_name)) if adapter_name else 0),
            "source_size_bytes": size_on_disk(source.path),
            "seconds": time.perf_counter() - t0, "peak_rss_mb": mem.peak_mb, **notes,
        }
        if verify and to != "onnx-graph":  # loads the full-precision source too: often longer than the conversion
            t1 = time.perf_counter()
            report.update(_verify(source, staging, to))
            report["verify_seconds"] = time.perf_counter() - t1
    return report


def _report_path(out: Path) -> Path:
    return out.with_name(out.name + layout.REPORT_SUFFIX)


def _source(src: str | Path | ModelSource, family: str | None, to: str) -> ModelSource:
    """``src`` as the runtime reads it, refused where it cannot be converted to ``to``."""
    source = src if isinstance(src, ModelSource) else source_at(src, family)
    if isinstance(src, ModelSource) and family not in (None, src.spec.family):
        raise ValueError(f"family={family!r}: {src.name} was resolved as {src.spec.family!r}; resolve it with that family")
    if source.kind == "artifact":
        raise ModelFormatError(f"{source.name} is an edgerank artifact; convert from the HF folder or GGUF it came from")
    if to == "gguf" and source.spec.kind == "cross-encoder":
        raise ValueError(
            f"GGUF conversion covers decoder rerankers and bi-encoders; {source.path} is a cross-encoder, "
            "and llama.cpp has no BERT pooler+classifier head, so it would score it wrongly")
    if source.adapter is not None:
        raise ModelFormatError(
            f"{source.path} is a base model plus the LoRA adapter {source.adapter.name}; "
            "convert from the trained HF folder it came from")
    return source


def _quant(to: str, quant: str | None, grid: str | None) -> tuple[str, list[str]]:
    """The quant to write (the default where none is asked), and warnings about it."""
    if quant is None:
        return {"gguf": SOURCE_GRIDS.get(grid, "q4_k_m"), "onnx": "int4", "onnx-graph": "int8"}[to], []
    if to == "gguf" and SOURCE_GRIDS.get(grid) in FOUR_BIT and quant in FOUR_BIT and quant != SOURCE_GRIDS[grid]:
        return quant, [f"the source is already quantised to {grid}; {quant} re-rounds every weight onto another "
                       f"4-bit grid, which costs ranking quality (bench/RESULTS.md); "
                       f"--quant {SOURCE_GRIDS[grid]} keeps the source's weights as they are"]
    return quant, []


def _adapter_name(source: ModelSource, to: str, quant: str, out: Path) -> str | None:
    """A trained LoRA stays unmerged beside a quantized GGUF (see ``gguf_export``): its file name."""
    if to == "gguf" and quant != "f16" and source.kind == "hf":
        from edgerank.converters.adapters import adapter_file

        if adapter_file(source.path) is not None:
            return f"{out.stem}.lora.gguf"
    return None


def _write(source: ModelSource, staging: Path, to: str, quant: str, progress: bool, instruction: str | None,
           rank_readout: bool, adapter_name: str | None) -> dict:
    """Write the conversion into ``staging``; returns the writer's notes for the report."""
    if to == "onnx-graph":
        from edgerank.converters.graph_export import write_graph

        return write_graph(source, staging, quant)
    if to == "onnx":
        from edgerank.converters.onnx_export import write_artifact

        return write_artifact(source.path, staging, quant, source.spec, progress)
    from edgerank.converters.gguf_export import write_gguf

    return write_gguf(source.path, staging, quant, source.spec, _label_ids(source), progress,
                      adapter_dest=staging.with_name(adapter_name) if adapter_name else None,
                      instruction=instruction, rank_readout=rank_readout)


def _label_ids(source: ModelSource) -> list[int] | None:
    """A decoder's yes/no label token ids, which a GGUF's rerank template names."""
    if source.spec.kind != "decoder":
        return None
    if source.kind == "hf":
        from edgerank.runtime.tokenization import HFTokenizer, label_token_ids

        return label_token_ids(HFTokenizer.from_file(source.path / "tokenizer.json"), source.spec.score.labels)
    from edgerank.converters.vocab import gguf_label_ids

    return gguf_label_ids(source.path, source.spec.score.labels)


def _verify(source, converted: Path, to: str) -> dict:
    """Score sample pairs with the full-precision source and the converted model (unpruned).

    The source runs on the torch reference backend where the ``reference`` extra is
    installed; on the core install it runs as an fp32 artifact on ONNX Runtime (converted
    into a temporary folder), which equals transformers within 1e-3 (tests)."""
    import tempfile

    from edgerank.converters.sample import SAMPLE
    from edgerank.converters.verify import compare
    from edgerank.runtime import extras
    from edgerank.runtime.reranker import Reranker

    if to == "gguf":
        extras.require("llamacpp", "verifying a GGUF conversion (or pass --no-verify)")
    options = {"backend": "llamacpp"} if to == "gguf" else {"backend": "edgerank", "pruning": False}
    family = source.spec.family
    with tempfile.TemporaryDirectory(prefix="edgerank-verify-") as tmp:
        if extras.missing("reference"):
            reference = Path(tmp) / "fp32"
            convert(source.path, "onnx", "fp32", reference, family=family, verify=False, progress=False)
            ref_options = {"backend": "edgerank", "pruning": False}
        else:
            reference, ref_options = source.path, {"backend": "reference"}
        forms = [None]
        if to == "onnx":  # the artifact's own format first, then each other form stored beside it
            from edgerank.runtime.artifact import Artifact

            own = Artifact.open(converted, verify=False)
            forms = [own.weights] + [f for f in own.forms if f != own.weights]
        with Reranker(source_at(reference, family), **ref_options) as ref:
            report = {"reference": ref_options["backend"]}
            for form in forms:
                with Reranker(source_at(converted, family), **options, **({"compute": form} if form else {})) as conv:
                    figures = compare(ref, conv, SAMPLE)
                if form in (None, forms[0]):
                    report.update(figures)
                else:  # e.g. "int8_form": the int8-compute layers of an int4 artifact
                    report[f"{form}_form"] = figures
            return report
