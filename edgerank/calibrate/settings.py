"""The pruning setting chosen from the rules' candidates, and written into the artifact's
``manifest.json`` (or a JSON config file) for the runtime to read."""

from __future__ import annotations

import json
from pathlib import Path

from edgerank.cli import write_atomic
from edgerank.errors import ConfigError
from edgerank.runtime import layout
from edgerank.runtime.pruning import DEFAULT_CLUSTERS


def choose(rows: list[dict], target: float) -> dict | None:
    """The setting that skips the most work while mean P@K stays at or above ``target``;
    among equals, the highest threshold, then the default cluster count."""
    ok = [r for r in rows if r["precision"] >= target]
    return max(ok, key=lambda r: (r["work_skipped"], r["threshold"],
                                  -abs(r.get("clusters", DEFAULT_CLUSTERS) - DEFAULT_CLUSTERS))) if ok else None


def knobs(setting: dict) -> str:
    if setting.get("rule") == "margin":
        return "rule=margin margin=" + ",".join(f"L{layer}:{m:.3g}" for layer, m in sorted(
            (int(a), b) for a, b in setting["margin"].items()))
    if setting.get("rule") == "rank":
        return "rule=rank keep=" + ",".join(f"L{layer}:{frac:g}" for layer, frac in sorted(
            (int(a), b) for a, b in setting["keep"].items()))
    return f"threshold={setting['threshold']} min_depth={setting['min_depth']} clusters={setting['clusters']}"


def _setting(row: dict) -> dict:
    if row.get("rule") == "margin":
        return {"rule": "margin", "margin": {str(layer): m for layer, m in sorted(
            (int(a), b) for a, b in row["margin"].items())}}
    if row.get("rule") == "rank":
        return {"rule": "rank", "keep": {str(layer): frac for layer, frac in sorted(
            (int(a), b) for a, b in row["keep"].items())}}
    return {"rule": "cluster", "threshold": row["threshold"], "min_depth": row["min_depth"],
            "clusters": row.get("clusters", DEFAULT_CLUSTERS)}


def better(*settings: dict | None) -> dict | None:
    """The setting that skips most work at the target (the first given on a tie)."""
    best = None
    for row in settings:
        if row is not None and (best is None or row["work_skipped"] > best["work_skipped"]):
            best = row
    return best


def write_setting(artifact: Path, setting: dict | None, meta: dict, config: Path | None = None,
                  by_k: dict[int, dict | None] | None = None) -> Path:
    """Store the chosen knobs in the artifact's manifest (atomically) or a config file;
    ``setting`` None writes pruning off (``{"off": true}``). ``by_k`` holds the settings
    chosen for each K (None: off); the runtime uses one for a call with that K, and the main
    setting for any other K."""
    target = config or artifact / layout.MANIFEST
    doc = settings_file(target)
    doc["pruning"] = {**(_setting(setting) if setting else {"off": True}), "calibrated": True, **meta}
    if by_k:  # a K that no setting kept at the target prunes nothing: {"off": true}
        doc["pruning"]["by_k"] = {str(k): {**_setting(row), "precision": row["precision"],
                                           "work_skipped": row["work_skipped"]} if row else {"off": True}
                                  for k, row in sorted(by_k.items())}
    write_atomic(target, json.dumps(doc, indent=1))
    return target


def settings_file(path: Path) -> dict:
    """The JSON object already in ``path`` (``{}`` if there is none yet); anything else
    there is the user's, and is refused rather than replaced."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} is not a folder to write {path.name} in")
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON settings file ({e}); it is left as it is") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} holds JSON but not an object; it is left as it is")
    return doc
