"""Open an edgerank artifact (written by ``edgerank.converters.onnx_export``) and check it first.

The runtime refuses an artifact whose format or format version it does not know, or whose
files do not match the sha256 sums in ``manifest.json``, before it loads anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerank.errors import ModelFormatError, is_int, is_number
from edgerank.runtime import layout
from edgerank.runtime.layout import FORMAT, SUPPORTED_VERSIONS, sha256_file

_DIMS = ("hidden", "ffn", "n_heads", "n_kv_heads", "head_dim")


def check_manifest(path: Path, manifest: object) -> None:
    """Raise :class:`ModelFormatError` unless ``manifest`` (parsed JSON) has the shape the
    runtime reads: valid JSON of the wrong shape (``null``, a list, a file entry without
    its size) is a bad artifact, not a crash deep in the runtime."""
    def bad(what: str) -> ModelFormatError:
        return ModelFormatError(f"{path}: manifest.json {what}")

    def positive_int(v: object) -> bool:
        return is_int(v) and v > 0

    if not isinstance(manifest, dict):
        raise bad(f"is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise ModelFormatError(f"{path} is not an edgerank artifact (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not is_int(version) or version not in SUPPORTED_VERSIONS:
        raise ModelFormatError(
            f"{path} has artifact format version {version!r}; this edgerank reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Re-convert the model with this edgerank's converter")
    files, layers = manifest.get("files"), manifest.get("layers")
    if not isinstance(files, dict):
        raise bad("has no 'files' object")
    for rel, info in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise bad(f"lists {rel!r}, a path outside the artifact")
        if not (isinstance(info, dict) and is_int(info.get("size")) and info["size"] >= 0
                and isinstance(info.get("sha256"), str)):
            raise bad(f"entry for {rel!r} needs a size (bytes) and a sha256")
    if not (isinstance(layers, list) and layers and all(isinstance(x, str) for x in layers)):
        raise bad("has no 'layers' list of file names")
    compute = manifest.get("compute") or {}
    forms = compute.get("forms") if isinstance(compute, dict) else None
    if not isinstance(compute, dict) or not isinstance(forms or {}, dict) or any(
            not (isinstance(v, list) and len(v) == len(layers) and all(isinstance(x, str) for x in v))
            for v in (forms or {}).values()):
        raise bad("'compute.forms' must map a weight format to one layer file per layer")
    for rel in [layout.TOKENIZER, layout.EMBED, layout.HEAD, *layers, *sum((forms or {}).values(), [])]:
        if rel not in files:
            raise ModelFormatError(f"{path}: manifest lists no {rel}")
    if not isinstance(manifest.get("architecture"), str):
        raise bad("names no architecture")
    if not isinstance(manifest.get("family", ""), str):
        raise bad("'family' is not a name")
    max_length = manifest.get("max_length")
    if max_length is not None and not positive_int(max_length):
        raise bad(f"'max_length' must be a positive int (got {max_length!r})")
    if not isinstance(manifest.get("pruning") or {}, dict):
        raise bad(f"'pruning' must be an object (got {manifest['pruning']!r})")
    _check_dims(path, manifest)


def _check_dims(path: Path, manifest: dict) -> None:
    """The manifest's ``dims``: positive sizes, and rotary settings for a decoder."""
    def bad(what: str) -> ModelFormatError:
        return ModelFormatError(f"{path}: manifest.json {what}")

    def positive_int(v: object) -> bool:
        return is_int(v) and v > 0

    dims = manifest.get("dims")
    if not isinstance(dims, dict):
        raise bad("has no 'dims' object")
    need = list(_DIMS) + (["context_length"] if manifest["architecture"] in ("bert", "xlm-roberta") else [])
    for key in need:
        if not positive_int(dims.get(key)):
            raise bad(f"dims.{key} must be a positive int (got {dims.get(key)!r})")
    if not is_int(dims.get("position_offset", 0)) or dims.get("position_offset", 0) < 0:
        raise bad(f"dims.position_offset must be an int >= 0 (got {dims.get('position_offset')!r})")
    if not (is_number(dims.get("norm_eps")) and 0 <= dims["norm_eps"] < 1):
        raise bad(f"dims.norm_eps must be a small number (got {dims.get('norm_eps')!r})")
    if manifest["architecture"] not in ("bert", "xlm-roberta"):
        if not (is_number(dims.get("rope_theta")) and 0 < dims["rope_theta"] < float("inf")):
            raise bad(f"dims.rope_theta must be a positive number (got {dims.get('rope_theta')!r})")
        if not isinstance(dims.get("rope_scaling") or {}, dict):
            raise bad(f"dims.rope_scaling must be an object or null (got {dims.get('rope_scaling')!r})")
        if dims["head_dim"] % 2:
            raise bad(f"dims.head_dim must be even for rotary positions (got {dims['head_dim']})")


@dataclass
class Artifact:
    """A checked artifact folder: its manifest, and paths to its parts."""

    path: Path
    manifest: dict
    verified: bool = True  # every file's sha256 was checked at open

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Artifact":
        path = Path(path)
        mf = path / layout.MANIFEST
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{mf} is missing or not valid JSON: {e}") from e
        check_manifest(path, manifest)
        files = manifest["files"]
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

    @property
    def weights(self) -> str:
        """The artifact's own weight format: ``int4``, ``int8`` or ``fp32``."""
        return (self.manifest.get("quant") or {}).get("weights", "int4")

    @property
    def forms(self) -> dict[str, list[str]]:
        """Every form the layers are stored in (weight format -> layer files): the artifact's
        own, and the extra ones under ``compute.forms`` (an int4 artifact's int8 layers)."""
        extra = (self.manifest.get("compute") or {}).get("forms") or {}
        return {self.weights: self.manifest["layers"], **extra}

    @property
    def usable_forms(self) -> list[str]:
        """The forms the runtime may choose unasked: the own one, and each extra form the
        converter found to rank like it (``compute.fit``, converters/verify.py)."""
        fit = (self.manifest.get("compute") or {}).get("fit") or {}
        return [f for f in self.forms if f == self.weights or (fit.get(f) or {}).get("fit") is True]

    def layer_files(self, form: str | None = None) -> list[str]:
        return self.forms[form or self.weights]

    def layer_path(self, i: int, form: str | None = None) -> Path:
        return self.path / self.layer_files(form)[i]

    def layer_bytes(self, i: int, form: str | None = None) -> int:
        return self.manifest["files"][self.layer_files(form)[i]]["size"]

    def head(self) -> dict[str, np.ndarray]:
        with np.load(self.path / layout.HEAD) as z:
            return {k: z[k].astype(np.float32) if z[k].dtype.kind == "f" else z[k] for k in z.files}
