"""Read safetensors files with numpy alone, so converting a model needs no torch.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets; ``__metadata__``), then the raw little-endian tensors. The ``safetensors``
package's numpy reader cannot give bf16 tensors (numpy has no bf16), and its torch
reader needs torch; here bf16 is widened to fp32 by shifting its bits into the high half.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edgerank.errors import ModelFormatError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """One safetensors file: tensor names, metadata, and each tensor as its own array."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > self.path.stat().st_size:
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelFormatError(f"{self.path} is not a readable safetensors file: {e}") from e
        if not isinstance(header, dict):
            raise ModelFormatError(f"{self.path}: its safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._header = header
        self._start = 8 + n

    def keys(self) -> list[str]:
        return list(self._header)

    def get(self, name: str, float32: bool = False) -> np.ndarray:
        """Tensor ``name`` as a fresh array (its own copy, not a view of the file); bf16 is
        returned as fp32, and every float as fp32 when ``float32``."""
        try:
            info = self._header[name]
            kind, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            dtype = np.dtype(_DTYPES[kind]).newbyteorder("<")
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"{self.path}: tensor {name!r} has an unreadable header entry: {e}") from e
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * dtype.itemsize:
            raise ModelFormatError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            raw = np.fromfile(f, dtype=dtype, count=count)
        if len(raw) != count:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is cut short")
        if kind == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        elif float32 and raw.dtype.kind == "f":
            raw = raw.astype(np.float32)
        return raw.astype(raw.dtype.newbyteorder("="), copy=False).reshape(shape)
