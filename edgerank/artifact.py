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
    verified: bool = True  # every file's sha256 was checked at open

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
        return cls(path, manifest, verify)

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
