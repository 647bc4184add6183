"""The optional parts of edgerank, the extra that installs each, and one clear error when
one is missing. The core (``pip install edgerank``) ranks, pulls and converts built-in
models with numpy, tokenizers, onnxruntime, onnx and gguf alone."""

from __future__ import annotations

import importlib.util

from edgerank.errors import MissingExtraError

# extra -> the import names it brings (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "llamacpp": ("llama_cpp",),
    "reference": ("torch", "transformers", "safetensors"),
    "hub": ("huggingface_hub",),
    "train": ("torch", "transformers", "peft", "safetensors"),
    "eval": ("bm25s", "rich"),
    "bench": ("matplotlib", "rich", "torch", "transformers", "llama_cpp"),
    "server": ("fastapi", "uvicorn", "prometheus_client"),
}


def missing(extra: str) -> list[str]:
    """The import names of ``extra`` that are not installed."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming ``pip install 'edgerank[extra]'`` when a
    package of ``extra`` is not installed; ``what`` says what needed it."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(f"{what} needs {', '.join(absent)}, which is not installed: "
                                f"pip install 'edgerank[{extra}]'")
