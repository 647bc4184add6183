"""Backends: each turns an EncodedBatch into one score per candidate.

A backend has ``name``, ``tokenizer`` (a :class:`edgerank.tokenization.Tokenizer`),
``score(batch) -> np.ndarray`` and ``close()``. Backends are imported on demand, so
``import edgerank`` never pulls in torch.
"""

from __future__ import annotations

from edgerank.errors import BackendUnavailableError
from edgerank.sources import ModelSource

BACKENDS = ("edgerank", "reference", "llamacpp")


def default_backend(source: ModelSource) -> str:
    """The backend a model runs on when none is named: ``edgerank`` for artifacts and
    built-in models, ``llamacpp`` for other GGUF files, ``reference`` for HF folders.
    Any model runs on ``edgerank`` when asked: it is converted to int4 on first use."""
    from models.catalog import BUILTINS

    if source.kind == "artifact" or source.name in BUILTINS:
        return "edgerank"
    if source.kind == "gguf":
        return "llamacpp"
    return "reference"


def load_backend(name: str, source: ModelSource, **options):
    """Instantiate backend ``name`` for ``source``; unknown options are an error."""
    if name == "edgerank":
        if source.kind != "artifact":  # an HF folder, a GGUF or a built-in: its cached int4 artifact
            import dataclasses

            from edgerank.cache import cached_artifact
            from edgerank.sources import resolve
            from models.catalog import BUILTINS

            model = source.name if source.name in BUILTINS else str(source.path)
            built = resolve(cached_artifact(model, family=source.spec.family), family=source.spec.family)
            source = dataclasses.replace(built, name=source.name)
        from edgerank.backends.layerwise import LayerwiseBackend

        return LayerwiseBackend(source, **options)
    if name == "reference":
        try:
            from edgerank.backends.reference import ReferenceBackend
        except ImportError as e:
            raise BackendUnavailableError(
                f"backend 'reference' needs torch and transformers ({e}); "
                "install them with: pip install 'edgerank[reference]'"
            ) from e
        return ReferenceBackend(source, **options)
    if name == "llamacpp":
        from edgerank.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(source, **options)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
