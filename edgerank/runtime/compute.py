"""Which form of the layers a model runs in on this CPU, chosen by measuring.

An int4 artifact stores its layers twice (``Artifact.forms``): as int4 ``MatMulNBits``
codes (the least memory) and as int8 ``DynamicQuantizeMatMul`` weights (int8 dot-product
kernels: the fastest where compute binds, which is reranking's case: every call is a
prefill of thousands of tokens). Which is faster depends on the CPU (VNNI, AMX, AVX2 only),
so it is measured: layer 0 of each form on one synthetic chunk, a few runs each. The
converter measures at conversion and writes the result in the manifest (``compute.measured``);
the runtime reuses it on the same CPU and measures again (once per process) on another.
The memory budget can still force int4 (``backends.layerwise``). Where a timing would
mislead (aarch64 under emulation: ``cpu.emulated``), the form is chosen by a rule instead
(``cpu.rule_form``, ``how="rule (arm)"``; docs/platforms.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from edgerank.runtime import layout
from edgerank.runtime.artifact import Artifact
from edgerank.runtime.cpu import RULE_HOW, cpu_id, rule_form
from edgerank.runtime.streaming import session_options

PROBE_ROWS, PROBE_TOKENS = 8, 128  # the measured chunk: 1,024 tokens, the size of a default chunk
PROBE_RUNS = 3  # timed runs per form, after one warm-up; the median counts
# another form replaces the artifact's own only when it is this much faster: a toss-up
# (tiny models, a noisy machine) keeps the stored format, so repeated loads agree
MARGIN = 0.9
_measured: dict[tuple[str, str], "Choice"] = {}  # (artifact's layer-0 sha256, CPU) -> choice, this process


@dataclass
class Choice:
    """The form a model runs in, and why: ``how`` is ``only form``, ``the other forms rank
    unlike it``, ``manifest`` (measured at conversion on this CPU), ``measured at load``,
    ``rule (arm)`` (not measured: an emulated CPU, ``cpu.rule_form``), ``asked`` (the
    caller's ``compute=``) or ``memory budget`` (int4 forced)."""

    form: str
    how: str
    ms: dict[str, float] = field(default_factory=dict)  # form -> ms per run of layer 0 on the probe
    cpu: str = ""

    def as_dict(self) -> dict:
        return {"form": self.form, "how": self.how, "probe_ms": self.ms, "cpu": self.cpu}


def measure(artifact: Artifact, form: str, threads: int) -> float:
    """Median ms of layer 0 in ``form`` on a synthetic chunk of PROBE_ROWS x PROBE_TOKENS."""
    sess = ort.InferenceSession(str(artifact.layer_path(0, form)), session_options(threads),
                                providers=["CPUExecutionProvider"])
    return median_ms(sess, probe_feeds(artifact), PROBE_RUNS)


def median_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int) -> float:
    """Median ms of ``runs`` runs of ``sess`` on ``feeds``, after one warm-up run."""
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def probe_feeds(artifact: Artifact) -> dict[str, np.ndarray]:
    """Inputs of one layer for PROBE_ROWS sequences of PROBE_TOKENS (no prefix, no padding)."""
    d, B, T = artifact.dims, PROBE_ROWS, PROBE_TOKENS
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((B, T, d["hidden"])).astype(np.float32)
    if artifact.is_encoder:
        return {layout.HIDDEN: hidden, layout.MASK: np.zeros((B, 1, 1, T), np.float32)}
    angle = np.arange(T)[:, None] * np.ones(d["head_dim"])[None] / 64
    past = np.zeros((1, d["n_kv_heads"], 1, 0, d["head_dim"]), np.float32)
    return {layout.HIDDEN: hidden, layout.MASK: layout.decoder_mask(np.full(B, T), T),
            layout.COS: np.broadcast_to(np.cos(angle), (B, T, d["head_dim"])).astype(np.float32),
            layout.SIN: np.broadcast_to(np.sin(angle), (B, T, d["head_dim"])).astype(np.float32),
            layout.PAST_KEY: past, layout.PAST_VALUE: past}


def measure_forms(artifact: Artifact, threads: int) -> dict:
    """Every stored form, measured here: what the converter writes as ``compute.measured``
    (no timings, and the rule's form, where the CPU is chosen for by rule)."""
    ruled = rule_form(artifact.usable_forms, artifact.weights)
    if ruled is not None:
        return {"cpu": cpu_id(), "threads": threads, "probe_tokens": 0, "ms": {}, "fastest": ruled, "how": RULE_HOW}
    ms = {form: round(measure(artifact, form, threads), 3) for form in artifact.forms}
    return {"cpu": cpu_id(), "threads": threads, "probe_tokens": PROBE_ROWS * PROBE_TOKENS, "ms": ms,
            "fastest": fastest(ms, artifact)}


def fastest(ms: dict[str, float], artifact: Artifact) -> str:
    """The form to run given each form's time: the quickest usable one (it ranks like the
    own form), if it beats the artifact's own format by the margin, else the own format."""
    own = artifact.weights
    best = min((f for f in artifact.usable_forms if f in ms), key=ms.get, default=own)
    return best if ms[best] < MARGIN * ms[own] else own


def choose(artifact: Artifact, threads: int, asked: str | None = None) -> Choice:
    """The form to run: the caller's (``asked``), the only one stored, the manifest's
    measurement when it was taken on this CPU with these threads, else a measurement now."""
    forms = artifact.forms
    cpu = cpu_id()
    if asked is not None:
        if asked not in forms:
            raise ValueError(f"compute={asked!r}: this artifact stores its layers as "
                             f"{', '.join(sorted(forms))}; choose one of them, or None to measure")
        return Choice(asked, "asked", cpu=cpu)
    if len(forms) == 1:
        return Choice(artifact.weights, "only form", cpu=cpu)
    if len(artifact.usable_forms) == 1:  # the others do not rank like it (compute.fit)
        return Choice(artifact.weights, "the other forms rank unlike it", cpu=cpu)
    ruled = rule_form(artifact.usable_forms, artifact.weights)
    if ruled is not None:  # an emulated CPU: its timings say nothing of real speed
        return Choice(ruled, RULE_HOW, cpu=cpu)
    measured = (artifact.manifest.get("compute") or {}).get("measured") or {}
    ms = measured.get("ms") or {}
    if measured.get("cpu") == cpu and measured.get("threads") == threads and set(ms) == set(forms):
        return Choice(fastest(ms, artifact), "manifest", dict(ms), cpu)
    key = (artifact.manifest["files"][artifact.manifest["layers"][0]]["sha256"], f"{cpu} x{threads}")
    if key not in _measured:
        ms = {form: measure(artifact, form, threads) for form in forms}
        _measured[key] = Choice(fastest(ms, artifact), "measured at load", ms, cpu)
    return _measured[key]
