"""The optional parts of edgerank, the extra that installs each, and one clear error when
one is missing. The core (``pip install edgerank``) ranks, pulls and converts built-in
models with numpy, tokenizers, onnxruntime, onnx and gguf alone."""

from __future__ import annotations

import importlib.util

from edgerank.errors import MissingExtraError

# extra -> the import names it brings (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "llamacpp": ("llama_cpp",),
    "openvino": ("openvino",),
    "reference": ("torch", "transformers", "safetensors"),
    "hub": ("huggingface_hub",),
    "train": ("torch", "transformers", "peft", "safetensors"),
    "eval": ("bm25s", "rich"),
    "bench": ("matplotlib", "rich", "torch", "transformers", "llama_cpp", "sentence_transformers"),
    "server": ("fastapi", "uvicorn", "prometheus_client"),
    "langchain": ("langchain_core",),
    "llama-index": ("llama_index.core",),
    "ray": ("ray", "pyarrow", "pandas"),  # ray[data]
}


def missing(extra: str) -> list[str]:
    """The import names of ``extra`` that are not installed."""
    return [m for m in EXTRAS[extra] if not installed(m)]


def installed(module: str) -> bool:
    """Whether the module ``module`` (dotted names too) can be imported."""
    # find_spec imports a dotted name's parent, and raises rather than answering None
    # when that parent (``llama_index`` of ``llama_index.core``) is itself absent
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def can_quantize_static() -> bool:
    """Whether NNCF and OpenVINO are installed (the ``openvino`` extra): what writes an
    encoder's int8-static form (converters/static_int8.py, where the form runs:
    ``compute.static_runs_here``). A plain check: the cache asks it on every load, without
    importing the converters."""
    return not missing("openvino") and installed("nncf")


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming ``pip install 'edgerank[extra]'`` when a
    package of ``extra`` is not installed; ``what`` says what needed it."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(f"{what} needs {', '.join(absent)}, which is not installed: "
                                f"pip install 'edgerank[{extra}]'")
