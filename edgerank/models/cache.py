"""The conversion cache: ``$EDGERANK_HOME/artifacts``.

Built-in models and model paths are converted on first use (the int4 artifact the
runtime runs, a GGUF for the llama.cpp comparison) and reused afterwards. An entry's name
is the model's name, a digest of its source files (names, sizes, modification times, first
64 KiB; not where they are, so a moved cache is reused) and
the quantization: ``minilm-l6-25228b0153-int4``. A retrained model gets a new digest, so
its old conversions are never used again; :func:`entries` finds those and
:func:`clean` removes them (``python -m edgerank.models cache --clean``), and nothing
the cache did not name itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edgerank.errors import OutputLocationError, UnsupportedModelError
from edgerank.models import pull
from edgerank.models.catalog import BUILTINS
from edgerank.models.pull import edgerank_home, ensure_dir
from edgerank.runtime import layout
from edgerank.runtime.artifact import Artifact
from edgerank.runtime.compute import BF16, PER_CALL_INT8, STATIC, runnable, static_runs_here
from edgerank.runtime.extras import can_quantize_static
from edgerank.runtime.sources import ModelSource, source_at

_NAME = re.compile(r"-(?P<digest>[0-9a-f]{10})-(?P<quant>[a-z0-9_]+)$")
_LEFTOVER = re.compile(r"^\..+\.(partial-.+|old-\d+)$")  # converters.output staging names
LEFTOVER_AGE_S = 3600  # a staging folder untouched this long belongs to no running conversion


def cache_dir() -> Path:
    return edgerank_home() / "artifacts"


SAMPLE_BYTES = 1 << 16


def source_digest(path: Path, family: str | None = None) -> str:
    """Digest of a model's files (names, sizes, modification times and their first 64 KiB),
    and of ``family`` when the model is converted under a family other than its own.

    Not of where the files are: a cache moved elsewhere (``EDGERANK_HOME`` with it) keeps
    naming its conversions the same and reuses them. The sampled bytes tell apart two
    models of one name whose sizes and times happen to agree."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamp = []
    for f in files:
        with open(f, "rb") as fh:
            head = hashlib.sha256(fh.read(SAMPLE_BYTES)).hexdigest()
        stamp.append([f.name, f.stat().st_size, f.stat().st_mtime_ns, head])
    if family is not None:
        stamp.append(["family", family])
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:10]


def _override(source: ModelSource) -> str | None:
    """``source``'s family if it differs from the one its files are detected as, else None."""
    family = source.spec.family
    try:  # a built-in's family is in the catalog; anything else is read from its files
        detected = BUILTINS[source.name].family if source.name in BUILTINS else source_at(source.path).spec.family
    except UnsupportedModelError:  # the family cannot be told from the files
        return family
    return None if family == detected else family


def cache_name(source: ModelSource) -> str:
    """The name under which conversions of ``source`` are cached: its name plus its
    :func:`source_digest`. Two models of one name, a model retrained in place, or one
    model converted as two families, never share a cached conversion."""
    stem = Path(source.name if source.name in BUILTINS else source.path).name.removesuffix(".gguf")
    return f"{stem}-{source_digest(source.path, _override(source))}"


def cached_artifact(source: ModelSource, quant: str = "int4", progress: bool = True) -> Path:
    """The int4 (or ``quant``) artifact of ``source`` (see ``edgerank.models.supply.resolve``),
    converted on first use and reused afterwards, in the family ``source`` was resolved as."""
    return _cached(source, "onnx", quant, progress)


def cached_gguf(source: ModelSource, quant: str, progress: bool = True) -> Path:
    """A ``quant`` GGUF conversion of ``source`` (for llama.cpp), converted on first use."""
    return _cached(source, "gguf", quant, progress)


def cached_graph(source: ModelSource, quant: str, progress: bool = True) -> Path:
    """``source`` as one standard ONNX graph (``--to onnx-graph``, a bench peer), exported on first use."""
    return _cached(source, "onnx-graph", quant, progress)


def _cached(source: ModelSource, to: str, quant: str, progress: bool) -> Path:
    dest = cache_dir() / (f"{cache_name(source)}-{'graph_' if to == 'onnx-graph' else ''}{quant}"
                          + (".gguf" if to == "gguf" else ""))
    if _needs_conversion(dest, to):
        from edgerank.converters import convert
        from edgerank.converters.output import claim

        ensure_dir(dest.parent)
        # processes that need one conversion at once: the first converts while the others
        # wait on the lock beside the entry, then find it done and load the same files
        with claim(dest, wait=True):
            if _needs_conversion(dest, to):
                convert(source, to, quant, dest, force=True, verify=False, progress=progress)
    return dest


def _needs_conversion(dest: Path, to: str) -> bool:
    """No complete conversion at ``dest`` (the converter renames its output into place last,
    so the file that marks it complete), or an artifact of an older form."""
    return not (dest if to == "gguf" else dest / layout.MANIFEST).is_file() or to == "onnx" and _older_form(dest)


def _older_form(artifact: Path) -> bool:
    """A cached artifact written before artifacts carried an int8 form checked for fit
    (``compute.fit``, beside the int4 layers; edgerank.runtime.compute), one whose forms were
    checked where the bf16 form could not run and that runs here now (OpenVINO installed since,
    or another CPU), a decoder's written before its layer graphs took ``past_mask`` (batched
    explanations), or an int4 encoder's without the int8-static form where it can be written
    now (OpenVINO and NNCF installed since): converted again."""
    try:
        manifest = json.loads((artifact / layout.MANIFEST).read_text())
        compute = manifest.get("compute")
        if not isinstance(compute, dict) or bool(compute.get("forms")) and "fit" not in compute:
            return True
        if BF16 in runnable(Artifact(artifact, manifest, verified=False)) and BF16 not in (compute.get("fit") or {}):
            return True
        if ((compute.get("ops") or {}).get("int8") or {}).get("op") == PER_CALL_INT8:  # scores moved with batch-mates
            return True
        if manifest.get("kind") == "decoder":
            return layout.PAST_MASK not in (manifest.get("layer_inputs") or ())
        return (manifest.get("quant") or {}).get("weights") == "int4" and STATIC not in (compute.get("forms") or {}) \
            and can_quantize_static() and static_runs_here()
    except (OSError, ValueError, AttributeError, KeyError):
        return True


# ---- what is in the cache, and what can go ---------------------------------------------

@dataclass
class Entry:
    """One cached conversion (or the leftover of an interrupted one) and its files."""

    name: str
    paths: list[Path]
    state: str  # current | stale | orphaned | leftover | unmanaged
    source: str | None
    size_bytes: int

    @property
    def removable(self) -> bool:
        """Stale, orphaned and leftover entries go. An entry not named by the cache
        (``unmanaged``: converted there by hand with ``--out``, or by an edgerank from
        before names carried a digest) is the user's to delete."""
        return self.state in ("stale", "orphaned", "leftover")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def _is_conversion(path: Path) -> bool:
    """Only what edgerank's converters write counts as a cache entry."""
    if path.is_dir():
        try:
            return json.loads((path / layout.MANIFEST).read_text()).get("format") == layout.FORMAT
        except (OSError, ValueError):
            return False
    if path.suffix == ".gguf" and not path.name.endswith(".lora.gguf"):
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    return False


def _state(path: Path, report: Path) -> tuple[str, str | None]:
    stem = path.name.removesuffix(".gguf")
    try:
        report_data = json.loads(report.read_text())
        source, family = report_data["source"], report_data.get("family")
    except (OSError, ValueError, KeyError, TypeError):
        source = family = None
    m = _NAME.search(stem)
    if m is None or source is None:
        return "unmanaged", source
    src = Path(source)
    if not src.exists():  # a built-in's source moves with the cache: find it where it is now
        name = stem[: m.start()]
        if name in BUILTINS and pull.is_present(name):
            src = pull.entry_path(name)
        else:
            return "orphaned", source
    # named for the files alone, or for the files converted under a family override
    current = m["digest"] in (source_digest(src), source_digest(src, family))
    return ("current" if current else "stale"), source


def _newest_mtime(path: Path) -> float:
    inside = path.rglob("*") if path.is_dir() else []
    return max([path.stat().st_mtime] + [f.stat().st_mtime for f in inside])


def entries(root: Path | None = None) -> list[Entry]:
    """Every conversion in the cache with its state; anything else there is left out."""
    root = Path(root) if root else cache_dir()
    if not root.is_dir():
        return []
    out: list[Entry] = []
    claimed: set[Path] = set()
    for path in sorted(root.iterdir()):
        if _LEFTOVER.match(path.name):
            if time.time() - _newest_mtime(path) > LEFTOVER_AGE_S:
                out.append(Entry(path.name, [path], "leftover", None, _size(path)))
            claimed.add(path)
            continue
        if not _is_conversion(path):
            continue
        report = path.with_name(path.name + layout.REPORT_SUFFIX)
        paths = [path] + [p for p in (report, path.with_name(path.stem + ".lora.gguf")) if p.exists()]
        claimed.update(paths)
        state, source = _state(path, report)
        out.append(Entry(path.name, paths, state, source, sum(_size(p) for p in paths)))
    for report in sorted(root.glob("*" + layout.REPORT_SUFFIX)):  # a report whose conversion is gone
        if report not in claimed and _NAME.search(report.name.removesuffix(layout.REPORT_SUFFIX).removesuffix(".gguf")):
            out.append(Entry(report.name, [report], "orphaned", None, _size(report)))
    return out


def clean(root: Path | None = None) -> list[Entry]:
    """Remove the stale, orphaned and leftover entries; returns what was removed. Only
    conversions the cache itself named, under the cache folder, are touched. A cache this
    process cannot write is an :class:`OutputLocationError` before anything is removed."""
    root = Path(root) if root else cache_dir()
    spare = [e for e in entries(root) if e.removable]
    if spare:
        check_cleanable(root)
    removed = []
    for e in spare:
        try:
            for p in e.paths:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        except OSError as err:  # a read-only file system, or a folder inside the entry
            raise OutputLocationError(f"cannot remove {e.name} from {root} ({err.strerror or err}); "
                                      f"{len(removed)} entries were removed before it") from err
        removed.append(e)
    return removed


def check_cleanable(root: Path | None = None) -> None:
    """Raise :class:`OutputLocationError` if entries cannot be removed from the cache folder:
    one this process may not write, or on a read-only file system."""
    root = Path(root) if root else cache_dir()
    if not root.is_dir():
        return
    if not os.access(root, os.W_OK | os.X_OK):  # a read-only mount too (EROFS)
        raise OutputLocationError(f"cannot clean {root}: this process may not write into it "
                                  "(edgerank's cache, set by EDGERANK_HOME)")
