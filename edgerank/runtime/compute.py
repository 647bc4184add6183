"""Which form of the layers a model runs in on this CPU, and on which engine.

An int4 artifact stores its layers twice (``Artifact.forms``): as int4 ``MatMulNBits`` codes
(the least memory) and as int8 weights multiplied with per-token int8 activations (``MatMulIntegerToFloat``:
int8 dot-product kernels). An int4 encoder converted where the ``openvino`` extra is installed
stores a third form, ``int8-static`` (activation scales fixed at conversion by NNCF:
converters/static_int8.py), which OpenVINO runs. Where that extra is installed and the CPU
multiplies bf16 in hardware (AVX512-BF16, AMX), the int4 files also run as ``bf16``: compiled
by OpenVINO with bf16 activations (``runtime.engines``). A form other than the artifact's own runs unasked only
where the converter found it ranks like the own one (``compute.fit``).

Which usable form runs is decided once per artifact and CPU, the same in every process: the
converter measures each form on layer 0 (``compute.measured``) and the runtime takes the
fastest on the CPU it was measured on; on any other CPU a fixed rule by the CPU's features
decides (:func:`by_rule`), never a timing taken at load, which two racing processes could
read differently. The memory budget can still force the smallest form (``backends.layerwise``),
which the stats say.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgerank.runtime import layout
from edgerank.runtime.artifact import Artifact
from edgerank.runtime.cpu import cpu_id, emulated, features, has_bf16, is_arm
from edgerank.runtime.engines import OPENVINO, ORT, load_layer, openvino_available

BF16 = "bf16"  # the int4 layer files, run by OpenVINO with bf16 activations
STATIC = "int8-static"  # stored layers with fixed activation scales, run by OpenVINO
# How OpenVINO runs each of its forms (engines.OpenVinoLayer): the precision of what is not
# int8, and the executors each layer keeps for the input shapes it ran last (a row runs at a
# width of its own length's, so shapes recur from call to call). The int8-static form builds
# its int8 kernels per shape: kept, minilm-l6 ran DL19 calls ~0.85x the time for ~60 MB; and
# in fp32 its layers stacked into one model equal them run one by one (speed.md §23). The
# bf16 form keeps none: on SmolLM2 they cost 310 MB for no measurable speed. The int8-static
# form's layers read their feeds in place (the request then holds the last ones: a form never
# run under a budget can).
ENGINE_OPTIONS = {BF16: {"precision": "bf16"},
                  STATIC: {"precision": "f32", "shapes_kept": 256, "share_inputs": True}}  # never under a budget
# forms whose layers between two pruning checks run as one model, resident (streaming.LayerSessions):
# minilm-l6's five layers before its check took 0.91x the time of five calls (speed.md §23)
STACKED = (STATIC,)
# forms whose memory the budget does not model: the int8-static form's OpenVINO executors and
# their scratch took 366 MB beyond the interpreter on minilm-l6 (the int8 form 109 MB), and a
# run under max_memory_mb=250 took 681 (speed.md §23); under a budget the next form runs
UNBUDGETED = (STATIC,)
PROBE_ROWS, PROBE_TOKENS = 8, 128  # the measured chunk: 1,024 tokens, the size of a default chunk
PROBE_RUNS = 9  # timed runs per form, interleaved across forms after one warm-up each; the median counts
# another form replaces the artifact's own only when it is this much faster: a toss-up
# (tiny models, a noisy machine) keeps the stored format, so repeated loads agree
MARGIN = 0.9
PER_CALL_INT8 = "DynamicQuantizeMatMul"  # the int8 form's op before per-token scales (issue 45)
# int8 dot products in hardware: x86 AVX2 (vpmaddubsw) and on, ARM dotprod
INT8_DOT = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
# CPUs the int8-static form runs on: those whose OpenVINO int8 kernels compute its scores
# exactly. Without AVX512-VNNI or AMX, u8 x s8 pair sums saturate at 16 bits (the int8 form's
# 7-bit codes avoid it): with oneDNN capped at AVX2, AVX2-VNNI or AVX-512 without VNNI, the
# sample's scores moved by up to 0.038 and drifted from fp32 2.9x as far (speed.md §23.5)
STATIC_CPUS = ("avx512_vnni", "amx_int8")


@dataclass
class Choice:
    """The form a model runs in, and why: ``how`` is ``only form``, ``the other forms rank
    unlike it``, ``manifest`` (measured at conversion on this CPU), ``rule`` (another CPU:
    :func:`by_rule`), ``asked`` (the caller's ``compute=``) or ``memory budget`` (the
    smallest form, forced)."""

    form: str
    how: str
    ms: dict[str, float] = field(default_factory=dict)  # form -> ms per run of layer 0 on the probe
    cpu: str = ""
    files: str = ""  # the stored form whose layer files run
    engine: str = ORT
    options: dict = field(default_factory=dict)  # how the engine runs it (ENGINE_OPTIONS)

    def as_dict(self) -> dict:
        return {"form": self.form, "how": self.how, "probe_ms": self.ms, "cpu": self.cpu, "engine": self.engine}


def runnable(artifact: Artifact) -> dict[str, tuple[str, str]]:
    """Every form the artifact can run in here: form -> (stored layer files, engine). A stored
    form names its engine in the manifest (``compute.ops``; ONNX Runtime when it does not)."""
    ops = (artifact.manifest.get("compute") or {}).get("ops") or {}
    out = {}
    for form in artifact.forms:
        engine = (ops.get(form) or {}).get("engine", ORT)
        if engine == ORT or engine == OPENVINO and openvino_available() and (form != STATIC or static_runs_here()):
            out[form] = (form, engine)
    # an fp32 artifact is asked for as full precision (the converter's reference, say): it stays fp32
    # OpenVINO's CPU plugin computes bf16 on x86 only (AVX512-BF16, AMX)
    if artifact.weights == "int4" and not is_arm() and openvino_available() and has_bf16():
        out[BF16] = (artifact.weights, OPENVINO)
    return out


def static_runs_here() -> bool:
    """Whether the int8-static form runs on this machine: OpenVINO installed, a CPU of :data:`STATIC_CPUS`."""
    return openvino_available() and any(f in features() for f in STATIC_CPUS)


def usable(artifact: Artifact, budgeted: bool = False) -> list[str]:
    """The forms that may run unasked: the own one, and each other runnable form the
    converter found to rank like it (``compute.fit``, converters/verify.py), except an int8
    form of one activation scale per call (artifacts from before per-token scales), whose
    scores move with their batch-mates; and under a memory budget (``budgeted``), a form whose
    memory the budget does not model (:data:`UNBUDGETED`)."""
    compute = artifact.manifest.get("compute") or {}
    fit, ops = compute.get("fit") or {}, compute.get("ops") or {}
    return [f for f in runnable(artifact) if f == artifact.weights or (fit.get(f) or {}).get("fit") is True
            and (ops.get(f) or {}).get("op") != PER_CALL_INT8 and not (budgeted and f in UNBUDGETED)]


def measure(artifact: Artifact, forms: list[str], threads: int) -> dict[str, float]:
    """Median ms of layer 0 in each of ``forms`` on a synthetic chunk of PROBE_ROWS x
    PROBE_TOKENS (a width OpenVINO's rows run at too: ``engines.OPENVINO_WIDTH_STEP``), each
    engine's forms interleaved so that a busy spell falls on all of them. ONNX Runtime's
    forms run before any OpenVINO layer is loaded: once one has run, its worker threads
    slowed ONNX Runtime's runs beside them (minilm-l6's int8 layer 15.4 -> 29 ms, speed.md §22)."""
    feeds = probe_feeds(artifact)
    here = runnable(artifact)
    times: dict[str, float] = {}
    for engine in (ORT, OPENVINO):
        runs = {}
        for form in forms:
            files, form_engine = here[form]
            if form_engine == engine:
                layer = load_layer(artifact.layer_path(0, files), engine, threads, **ENGINE_OPTIONS.get(form, {}))
                runs[form] = lambda layer=layer: layer.run(None, feeds)
                runs[form]()
        samples: dict[str, list[float]] = {form: [] for form in runs}
        for _ in range(PROBE_RUNS):
            for form, run in runs.items():
                t = time.perf_counter()
                run()
                samples[form].append(time.perf_counter() - t)
        times.update({form: 1000 * float(np.median(ts)) for form, ts in samples.items()})
    return {form: times[form] for form in forms}


def median_ms(sess, feeds: dict[str, np.ndarray], runs: int) -> float:
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
        return layout.encoder_inputs(hidden, np.full(B, T))
    angle = np.arange(T)[:, None] * np.ones(d["head_dim"])[None] / 64
    rope = (np.broadcast_to(np.cos(angle), (B, T, d["head_dim"])).astype(np.float32),
            np.broadcast_to(np.sin(angle), (B, T, d["head_dim"])).astype(np.float32))
    return layout.decoder_inputs(hidden, *rope, layout.decoder_mask(np.full(B, T), T),
                                 layout.no_past(d["n_kv_heads"], d["head_dim"]))


def measure_forms(artifact: Artifact, threads: int) -> dict:
    """Every form runnable here, measured: what the converter writes as ``compute.measured``.
    Under emulation (an aarch64 Python on x86: ``cpu.emulated``) a timing measures the
    translator, not the CPU, so nothing is timed and :func:`by_rule` names the form."""
    if emulated():
        return {"cpu": cpu_id(), "threads": threads, "probe_tokens": 0, "ms": {},
                "fastest": by_rule(usable(artifact)), "how": "rule"}
    ms = {form: round(v, 3) for form, v in measure(artifact, list(runnable(artifact)), threads).items()}
    return {"cpu": cpu_id(), "threads": threads, "probe_tokens": PROBE_ROWS * PROBE_TOKENS, "ms": ms,
            "fastest": fastest(ms, artifact)}


def fastest(ms: dict[str, float], artifact: Artifact, budgeted: bool = False) -> str:
    """The form to run given each form's time: the quickest usable one (it ranks like the
    own form), if it beats the artifact's own format by the margin, else the own format.
    A form on OpenVINO must also beat the quickest ONNX Runtime form by the margin: the bf16
    form holds ~3x the memory, and on minilm-l6 a probe that favoured it by 2% ran real calls
    1.23x slower than the int8 form (speed.md §22)."""
    own = artifact.weights
    forms = runnable(artifact)
    ok = [f for f in usable(artifact, budgeted) if f in ms]
    best = min(ok, key=ms.get, default=own)
    if forms.get(best, ("", ORT))[1] != ORT:
        on_ort = min((f for f in ok if forms[f][1] == ORT), key=ms.get, default=own)
        best = best if ms[best] < MARGIN * ms[on_ort] else on_ort
    return best if ms[best] < MARGIN * ms[own] else own


def by_rule(forms: list[str]) -> str:
    """The form a CPU that no measurement was recorded on runs (or an emulated one, which is
    never timed), from ``forms`` (the usable ones), as measured (bench/history/speed.md §19, §23):
    int8-static where it runs (an encoder's only, on :data:`STATIC_CPUS`; on Zen 4 it beat
    every other form on minilm-l6); bf16 on AMX's matrix tiles; else int8 where the CPU
    has int8 dot products (x86 AVX2 on; ARM DotProd or I8MM, on which ONNX Runtime's int8
    GEMM is built; on Zen 4's AVX512-BF16 the int8 form beat bf16 on minilm-l6); else bf16
    (it beat int4 on every CPU with bf16); else the artifact's own."""
    has = features()
    if STATIC in forms:
        return STATIC
    if BF16 in forms and "amx_bf16" in has:
        return BF16
    if "int8" in forms and any(f in has for f in INT8_DOT):
        return "int8"
    if BF16 in forms:
        return BF16
    return forms[0]


def choose(artifact: Artifact, threads: int, asked: str | None = None, budgeted: bool = False) -> Choice:
    """The form to run: the caller's (``asked``), the only usable one, the manifest's
    measurement when it was taken on this CPU with these threads, else :func:`by_rule`;
    ``budgeted``: under a memory budget, which some forms may not run under (:data:`UNBUDGETED`)."""
    forms, cpu = runnable(artifact), cpu_id()

    def choice(form: str, how: str, ms: dict | None = None) -> Choice:
        return Choice(form, how, dict(ms or {}), cpu, *forms[form], ENGINE_OPTIONS.get(form, {}))

    if asked is not None:
        if asked not in forms:
            why = {BF16: " (bf16 runs on OpenVINO where the CPU has bf16 hardware: pip install 'edgerank[openvino]')",
                   STATIC: " (int8-static is stored by an int4 encoder's conversion where the openvino extra is "
                           "installed, and runs on OpenVINO: pip install 'edgerank[openvino]')"}.get(asked, "")
            raise ValueError(f"compute={asked!r}: this artifact runs here as {', '.join(sorted(forms))}{why}; "
                             "choose one of them, or None to let edgerank choose")
        if budgeted and asked in UNBUDGETED:
            raise ValueError(f"compute={asked!r} runs without max_memory_mb: the budget does not model its "
                             "OpenVINO executors' memory; leave out one of the two")
        return choice(asked, "asked")
    ok = usable(artifact, budgeted)
    if len(ok) == 1:  # one stored form (any other unchecked), the others rank unlike it (compute.fit), or the budget
        why = ("only form" if len(artifact.forms) == 1 else "memory budget" if len(usable(artifact)) > 1
               else "the other forms rank unlike it")
        return choice(artifact.weights, why)
    measured = (artifact.manifest.get("compute") or {}).get("measured") or {}
    ms = measured.get("ms") or {}
    if measured.get("cpu") == cpu and measured.get("threads") == threads and set(ok) <= set(ms):
        return choice(fastest(ms, artifact, budgeted), "manifest", ms)
    return choice(by_rule(ok), "rule", ms if measured.get("cpu") == cpu else None)
