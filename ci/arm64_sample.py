"""Score the built-in sample (edgerank.converters.sample.SAMPLE: 64 pairs) with one artifact,
per stored compute form, and compare two such runs (aarch64 against x86). Part of ci/arm64.sh.

    python ci/arm64_sample.py score ARTIFACT OUT.json [FORMS]  # on each platform, same ARTIFACT folder
    python ci/arm64_sample.py compare X86.json ARM.json   # Spearman, max |delta|, top-10 per query
    python ci/arm64_sample.py files ARTIFACT_A ARTIFACT_B  # which files of two conversions differ
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def score(artifact: str, out: str, only: str = "") -> None:
    import onnxruntime

    import edgerank
    from edgerank.converters.sample import SAMPLE
    from edgerank.runtime import cpu

    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    own = (manifest.get("quant") or {}).get("weights", "int4")
    forms = [own, *sorted(f for f in (manifest.get("compute") or {}).get("forms") or {} if f != own)]
    forms = [f for f in forms if f in only.split(",")] if only else forms
    result = {"machine": platform.machine(), "cpu_id": cpu.cpu_id(), "emulated": cpu.emulated(),
              "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "forms": {}}
    with edgerank.Reranker(artifact, pruning=False) as r:  # the form this CPU runs unasked, and why
        query, docs = SAMPLE[0]
        result["unasked"] = r.rank(query, docs).stats.extra.get("compute", {})
    for form in forms:
        t = time.perf_counter()
        with edgerank.Reranker(artifact, compute=form, pruning=False) as r:
            scores = [[float(x) for x in r.score(q, docs)] for q, docs in SAMPLE]
        result["forms"][form] = {"scores": scores, "s": round(time.perf_counter() - t, 1)}
    Path(out).write_text(json.dumps(result))
    timing = ", ".join(f"{f} in {v['s']} s" for f, v in result["forms"].items())
    print(f"{platform.machine()} ({result['cpu_id']}, emulated={result['emulated']}): runs "
          f"{result['unasked'].get('form')} unasked ({result['unasked'].get('how')}); scored {timing}")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(x86: str, arm: str) -> int:
    """Per form: Spearman and max |delta| over the 64 pairs, and per query (8 passages each, so
    a top 10 is the whole list) whether the order is the same; where it is not, the
    passages that swapped and how far apart x86 scored them. Exit 1 on a real divergence:
    Spearman under 0.999 or a query whose top 3 differs."""
    a, b = json.loads(Path(x86).read_text()), json.loads(Path(arm).read_text())
    print(f"x86: {a['cpu_id']} (onnxruntime {a['onnxruntime']}); aarch64: {b['cpu_id']} "
          f"(onnxruntime {b['onnxruntime']}, emulated={b['emulated']})")
    print(f"form chosen unasked: x86 {a['unasked'].get('form')} ({a['unasked'].get('how')}); "
          f"aarch64 {b['unasked'].get('form')} ({b['unasked'].get('how')})")
    ok = True
    for form in (f for f in a["forms"] if f in b["forms"]):
        qa, qb = a["forms"][form]["scores"], b["forms"][form]["scores"]
        sa, sb = np.concatenate(qa), np.concatenate(qb)
        rho, delta = _spearman(sa, sb), float(np.max(np.abs(sa - sb)))
        same, notes = 0, []
        for i, (x, y) in enumerate(zip(qa, qb)):
            x, y = np.asarray(x), np.asarray(y)
            ox, oy = np.argsort(-x, kind="stable"), np.argsort(-y, kind="stable")
            if list(ox) == list(oy):
                same += 1
                continue
            moved = [int(d) for d, e in zip(ox, oy) if d != e]
            gap = float(np.ptp(x[moved]))
            notes.append(f"query {i}: passages {moved} reordered (x86 scores {gap:.4f} apart, "
                         f"max |delta| {np.max(np.abs(x - y)):.4f})")
            ok &= set(ox[:3]) == set(oy[:3])
        ok &= rho >= 0.999
        top10 = np.mean([len(set(np.argsort(-np.asarray(x))[:10]) & set(np.argsort(-np.asarray(y))[:10]))
                         / min(10, len(x)) for x, y in zip(qa, qb)])
        print(f"{form}: {len(sa)} pairs: Spearman {rho:.6f}, max |delta| {delta:.2e}, "
              f"top-10 agreement {top10:.3f}, same order in {same}/{len(qa)} queries"
              + "".join(f"\n    {n}" for n in notes))
    return 0 if ok else 1


def files(a: str, b: str) -> None:
    fa, fb = (json.loads((Path(x) / "manifest.json").read_text())["files"] for x in (a, b))
    differ = sorted(f for f in fa.keys() | fb.keys() if (fa.get(f) or {}).get("sha256") != (fb.get(f) or {}).get("sha256"))
    print(f"conversions on x86 and on aarch64: {len(fa) - len(differ)} of {len(fa)} files byte-identical"
          + (f"; differ: {', '.join(differ)}" if differ else ""))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "score":
        score(*args)
    elif cmd == "files":
        files(*args)
    else:
        sys.exit(compare(*args))
