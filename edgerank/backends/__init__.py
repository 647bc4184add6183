"""Backends: each turns an EncodedBatch into one score per candidate.

A backend has ``name``, ``tokenizer`` (a :class:`edgerank.tokenization.Tokenizer`),
``score(batch) -> np.ndarray`` and ``close()``. Backends are imported on demand, so
``import edgerank`` never pulls in torch.
"""

from __future__ import annotations

import inspect

from edgerank.errors import BackendUnavailableError, OptionError
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
    """Instantiate backend ``name`` for ``source``; unknown options are an error, raised
    before any work (an ``edgerank`` run of a non-artifact converts it first)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    cls = _backend_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "source")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(f"backend {name!r} takes no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(accepted)}")
    if name == "edgerank" and source.kind != "artifact":  # an HF folder, a GGUF or a built-in: its cached int4 artifact
        import dataclasses

        from edgerank.cache import cached_artifact
        from edgerank.sources import resolve
        from models.catalog import BUILTINS

        model = source.name if source.name in BUILTINS else str(source.path)
        built = resolve(cached_artifact(model, family=source.spec.family), family=source.spec.family)
        source = dataclasses.replace(built, name=source.name)
    return cls(source, **options)


def _backend_class(name: str) -> type:
    if name == "edgerank":
        from edgerank.backends.layerwise import LayerwiseBackend

        return LayerwiseBackend
    if name == "reference":
        try:
            from edgerank.backends.reference import ReferenceBackend
        except ImportError as e:
            raise BackendUnavailableError(
                f"backend 'reference' needs torch and transformers ({e}); "
                "install them with: pip install 'edgerank[reference]'"
            ) from e
        return ReferenceBackend
    from edgerank.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend
