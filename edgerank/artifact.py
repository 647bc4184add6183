"""Open an edgerank artifact (written by ``converters.onnx_export``) and check it first.

The runtime refuses an artifact whose format or format version it does not know, or whose
files do not match the sha256 sums in ``manifest.json``, before it loads anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerank.errors import ModelFormatError
from edgerank.pull import sha256_file

FORMAT = "edgerank-artifact"
FORMAT_VERSION = 1  # what the converter writes
SUPPORTED_VERSIONS = (1,)  # what the runtime reads


@dataclass
class Artifact:
    """A checked artifact folder: its manifest, and paths to its parts."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Artifact":
        path = Path(path)
        mf = path / "manifest.json"
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{mf} is missing or not valid JSON: {e}") from e
        if manifest.get("format") != FORMAT:
            raise ModelFormatError(f"{path} is not an edgerank artifact (format {manifest.get('format')!r})")
        version = manifest.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFormatError(
                f"{path} has artifact format version {version!r}; this edgerank reads version(s) "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Re-convert the model with this edgerank's converter")
        files = manifest.get("files") or {}
        for rel in ["tokenizer.json", "embed.npy", "head.npz", *manifest.get("layers", [])]:
            if rel not in files:
                raise ModelFormatError(f"{path}: manifest lists no {rel}")
        for rel, info in files.items():
            f = path / rel
            if not f.is_file():
                raise ModelFormatError(f"{path}: {rel} is missing")
            if f.stat().st_size != info["size"]:
                raise ModelFormatError(f"{path}: {rel} is {f.stat().st_size} bytes, the manifest says {info['size']}")
            if verify and sha256_file(f) != info["sha256"]:
                raise ModelFormatError(f"{path}: {rel} does not match its sha256 in manifest.json "
                                       "(the file was modified or corrupted)")
        return cls(path, manifest)

    @property
    def dims(self) -> dict:
        return self.manifest["dims"]

    @property
    def n_layers(self) -> int:
        return len(self.manifest["layers"])

    @property
    def is_encoder(self) -> bool:
        return self.manifest["architecture"] in ("bert", "xlm-roberta")

    def layer_path(self, i: int) -> Path:
        return self.path / self.manifest["layers"][i]

    def layer_bytes(self, i: int) -> int:
        return self.manifest["files"][self.manifest["layers"][i]]["size"]

    def head(self) -> dict[str, np.ndarray]:
        with np.load(self.path / "head.npz") as z:
            return {k: z[k].astype(np.float32) if z[k].dtype.kind == "f" else z[k] for k in z.files}


def cache_name(model: str) -> str:
    """The name under which conversions of ``model`` are cached: its name plus a digest of
    where its files are, their sizes and modification times. Two models of one name, or a
    model retrained in place, never share a cached conversion."""
    import hashlib

    from edgerank import pull
    from models.catalog import BUILTINS

    if str(model) in BUILTINS:
        if not pull.is_present(str(model)):
            pull.pull(str(model))
        path = pull.entry_path(str(model)).resolve()
    else:
        path = Path(model).expanduser()
        if not path.exists():  # an hf:ORG/NAME id, or a clear error for a wrong path
            from edgerank.sources import resolve

            path = resolve(model).path
        path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamp = [str(path)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    digest = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:10]
    return f"{Path(str(model)).name.removesuffix('.gguf')}-{digest}"


def cached_artifact(model: str, quant: str = "int4", progress: bool = True) -> Path:
    """The int4 (or ``quant``) artifact of a built-in model or a model path, converted on
    first use into ``EDGERANK_HOME/artifacts`` and reused afterwards."""
    from edgerank.pull import edgerank_home

    dest = edgerank_home() / "artifacts" / f"{cache_name(model)}-{quant}"
    if not (dest / "manifest.json").is_file():
        from converters import convert

        dest.parent.mkdir(parents=True, exist_ok=True)
        convert(model, "onnx", quant, dest, force=True, verify=False, progress=progress)
    return dest
