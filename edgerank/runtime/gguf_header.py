"""A GGUF file's metadata, read from its header without loading the vocabulary.

``gguf.GGUFReader`` parses every field, the tokenizer's arrays of 50-150 thousand strings
included, into numpy arrays: reading SmolLM2's metadata that way added ~160 MB to the
process (issue 42), more than a tight ``max_memory_mb`` allows. This reader walks the
key-value section once and keeps the scalars and strings; arrays are stepped over. The
layout is GGUF's (versions 2 and 3): ``GGUF``, version u32, tensor count u64, key-value
count u64, then each key (u64 length + UTF-8), value type u32 and value.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from edgerank.errors import ModelFormatError

MAGIC = b"GGUF"
# value type -> struct format of one value (8: string, 9: array, handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_KEY = 1 << 16  # a longer key is a corrupt file, not a key
MAX_STRING = 1 << 26  # likewise a longer string value (chat templates run to kilobytes)


def gguf_metadata(path: str | Path) -> dict:
    """Scalar and string metadata of a GGUF file (arrays such as the vocabulary skipped)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise ModelFormatError(f"{str(path)!r} is not a GGUF file (no 'GGUF' magic)")
            version, tensors, count = struct.unpack("<IQQ", _exactly(f, 20))
            if version not in (2, 3):
                raise ModelFormatError(f"{str(path)!r} is GGUF version {version}; edgerank reads versions 2 and 3")
            out = {"GGUF.version": version, "GGUF.tensor_count": tensors, "GGUF.kv_count": count}  # as gguf-py names them
            for _ in range(count):
                key = _string(f, MAX_KEY)
                (kind,) = struct.unpack("<I", _exactly(f, 4))
                value = _value(f, kind)
                if value is not _SKIPPED:
                    out[key] = value
            return out
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, ModelFormatError):
            raise
        raise ModelFormatError(f"{str(path)!r} is not a readable GGUF file: {e}") from e


_SKIPPED = object()


def _value(f: BinaryIO, kind: int):
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, _exactly(f, struct.calcsize(fmt)))[0]
    if kind == STRING:
        return _string(f, MAX_STRING)
    if kind == ARRAY:
        elem, n = struct.unpack("<IQ", _exactly(f, 12))
        if elem in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[elem]), 1)
        elif elem == STRING:
            for _ in range(n):
                (length,) = struct.unpack("<Q", _exactly(f, 8))
                f.seek(length, 1)
        else:
            for _ in range(n):
                _value(f, elem)
        return _SKIPPED
    raise ValueError(f"unknown GGUF value type {kind}")


def _string(f: BinaryIO, limit: int) -> str:
    (length,) = struct.unpack("<Q", _exactly(f, 8))
    if length > limit:
        raise ValueError(f"a string of {length} bytes")
    return _exactly(f, length).decode("utf-8", errors="replace")


def _exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the file ends inside its header")
    return data
