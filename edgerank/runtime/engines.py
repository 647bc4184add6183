"""The engines that run one layer graph: ONNX Runtime (the stored int4 and int8 forms) and
OpenVINO (the ``bf16`` form: the int4 layer files, compiled with bf16 activations where the
CPU multiplies bf16 in hardware, AVX512-BF16 or AMX; and the stored ``int8-static`` form).

Both give the runtime one interface, ONNX Runtime's: ``run(None, feeds)`` returns the graph's
outputs as fresh numpy arrays, ``get_inputs()`` names its inputs and their shapes.
OpenVINO is an optional extra (``pip install 'edgerank[openvino]'``); ONNX Runtime is the core.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgerank.runtime.extras import missing
from edgerank.runtime.layout import HIDDEN, HIDDEN_OUT

ORT, OPENVINO = "onnxruntime", "openvino"
# OpenVINO's bf16 results depend on the padded width a row runs at (its attention blocks the
# keys by it), never on how many rows run beside it: the runtime pads each row to its own
# length rounded up to this step and batches rows of one width (``chunking.width_chunks``)
OPENVINO_WIDTH_STEP = 16


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No per-session arena: with one session per layer, arenas would each keep their own
    # peak activations alive. Freed buffers go straight back.
    opts.enable_cpu_mem_arena = False
    # Every call has new input shapes; ORT's memory-pattern cache keeps a plan per shape
    # and grew a resident session's RSS from 542 to 982 MB over six DL19 queries
    # (flat at ~470 MB without it, same speed). See bench/history/speed.md §6.3.
    opts.enable_mem_pattern = False
    # Idle pool threads block instead of spinning. Every layer session has its own pool,
    # so a finished layer's spinning threads competed with the next layer's, and with any
    # other busy process: paired, 0.74x (minilm-l6) and 0.81x (smollm2) the latency beside
    # a training job, 1.02x and 0.96x on a quiet machine. See bench/history/speed.md §9.3.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def openvino_available() -> bool:
    """Whether the ``openvino`` extra is installed."""
    return not missing("openvino")


@functools.cache
def _core():
    import openvino as ov

    return ov.Core()


@dataclass(frozen=True)
class InputInfo:
    """A graph input's name and shape (ints where fixed, names where not), as ORT's ``NodeArg``."""

    name: str
    shape: list


class OpenVinoLayer:
    """One layer graph (or consecutive encoder layers: :func:`stacked`) compiled by OpenVINO's
    CPU plugin, behind ONNX Runtime's interface.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``bf16`` runs the matrix
    products (and most other ops) on bf16 activations with fp32 accumulation; int4 weights
    stay compressed in memory and are decompressed inside the matmul kernels."""

    def __init__(self, path: Path | list[Path], threads: int, precision: str = "bf16", shapes_kept: int = 0,
                 share_inputs: bool = False) -> None:
        core = _core()
        model = core.read_model(str(path)) if isinstance(path, Path) else stacked(path)
        self._compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": int(threads),
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # executors kept per input shape (``shapes_kept``; compute.ENGINE_OPTIONS)
            "CPU_RUNTIME_CACHE_CAPACITY": int(shapes_kept),
        })
        self._request = self._compiled.create_infer_request()
        self._share_inputs = share_inputs
        self._inputs = [InputInfo(p.any_name, [d.get_length() if d.is_static else "?" for d in p.get_partial_shape()])
                        for p in self._compiled.inputs]
        self._names = {i.name for i in self._inputs}
        self._outputs = list(self._compiled.outputs)

    def get_inputs(self) -> list[InputInfo]:
        return self._inputs

    def release_memory(self) -> None:
        """Free what the layer keeps between runs: its infer request's tensors and the
        compiled model's intermediate buffers, both sized for the largest chunk it has run.
        Kept, 30 resident SmolLM2 layers took a DL19 run to 1,966 MB (bench/history/speed.md §22)."""
        self._request = None
        self._compiled.release_memory()
        self._request = self._compiled.create_infer_request()

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs for ``feeds`` (inputs the graph does not take are ignored), as copies."""
        # ``share_inputs``: the feeds are read in place, not copied into OpenVINO's tensors first
        # (~0.1 ms an input, 28 ms of a minilm-l6 DL19 call), but the request holds the last
        # ones until its next run; the outputs are copied out, as the next run reuses them
        result = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items() if k in self._names},
                                     share_inputs=self._share_inputs, share_outputs=False)
        if output_names is None:
            return [result[o] for o in self._outputs]
        by_name = {o.any_name: o for o in self._outputs}
        return [result[by_name[n]] for n in output_names]


def stacked(paths: list[Path]):
    """Consecutive encoder layer graphs as one OpenVINO model: each layer's hidden states
    feed the next, every layer reads the first one's mask. Run as one, the layers skip a
    call, a copy out and back in, and OpenVINO's layout changes between them; in fp32 its
    results equal the layers run one by one, bit for bit (bench/history/speed.md §23)."""
    from openvino import Model
    from openvino import opset13 as ops

    models = [_core().read_model(str(p)) for p in paths]
    params = {p.get_friendly_name(): p for p in models[0].get_parameters()}
    out = models[0].get_results()[0].input_value(0)
    for model in models[1:]:
        for p in model.get_parameters():
            source = out if p.get_friendly_name() == HIDDEN else params[p.get_friendly_name()].output(0)
            for target in list(p.output(0).get_target_inputs()):
                target.replace_source_output(source)
        out = model.get_results()[0].input_value(0)
    result = ops.result(out)
    result.output(0).get_tensor().set_names({HIDDEN_OUT})
    return Model([result], list(params.values()), "layers")


def load_layer(path: Path | list[Path], engine: str, threads: int, **options):
    """Layer graph ``path`` ready to run on ``engine`` (:data:`ORT` or :data:`OPENVINO`, with
    :class:`OpenVinoLayer`'s ``options``; on OpenVINO a list of encoder layers runs as one:
    :func:`stacked`)."""
    if engine == OPENVINO:
        return OpenVinoLayer(path, threads, **options)
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
