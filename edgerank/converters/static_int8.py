"""The ``int8-static`` form of an encoder's layers: int8 weights and int8 activations with
scales fixed at conversion, written by NNCF and run by OpenVINO.

The ``int8`` form measures each token's activation scale at run time, and runs its
projections alone as int8 (ONNX Runtime). NNCF's post-training quantization
(``nncf.quantize``, transformer preset: SmoothQuant, fast bias correction) instead
calibrates every activation's scale once, on the built-in sample, and OpenVINO then runs the
whole layer in int8 where it can, attention's Q·Kᵀ included. On minilm-l6's layer 0 (Zen 4,
1,024 tokens) that took 8.9 ms against the int8 form's 14.0 (bench/history/speed.md §23).

A scale fixed at conversion depends on no other candidate, so a pair's score stays its own
whatever runs beside it (OpenVINO's rows are batched by width: ``runtime.engines``).

Each layer is quantized from its fp32 graph on that layer's own inputs: the calibration
sequences (:func:`calibration_sequences`: each sample query with another query's passages,
so the pairs the fit check scores are not the ones calibrated on) carried from layer to
layer through the fp32 graphs. NNCF runs in a child process (``python -m
edgerank.converters.static_int8 WORK``): importing it adds ~240 MB and 2 s to a process,
which a first ranking that converts would otherwise keep. Decoders get no such form: int8
activations, even per token and smoothed, ranked SmolLM2 unlike its own form (Spearman
0.877; speed.md §18.4-18.8).

Needs the ``openvino`` extra (OpenVINO and NNCF) and a CPU the form runs on
(``runtime.compute.STATIC_CPUS``); elsewhere the artifact has no such form.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from edgerank.runtime import layout

STATIC_FORM = "int8-static"
CALIBRATION_ROWS = 8  # sequences per calibration batch (one NNCF sample each)
BATCHES = "batches.npz"  # in the work folder: the calibration batches' layer-0 inputs


def calibration_sequences(tokenizer, spec, sample) -> list[tuple[list[int], list[int] | None]]:
    """(token ids, token types) of the calibration sequences: query i of ``sample`` with the
    passages of query i+1 through the family's template (a bi-encoder's query and passages
    are sequences of their own), shortest first so that a batch wastes little on padding."""
    from edgerank.runtime.tokenization import encode_pairs

    seqs: list[tuple[list[int], list[int] | None]] = []
    for i, (query, _) in enumerate(sample):
        batch = encode_pairs(spec, tokenizer, query, sample[(i + 1) % len(sample)][1])
        types = batch.type_ids or [None] * len(batch.sequences)
        seqs += list(zip(batch.sequences, types))
        if batch.query is not None:
            seqs.append((batch.query, batch.query_type_ids))
    return sorted(seqs, key=lambda s: len(s[0]))


class StaticForm:
    """The form being written: each layer's fp32 graph collected in a work folder
    (:meth:`add`), then quantized by NNCF in a child process (:meth:`write`)."""

    def __init__(self, dest: Path, sequences: list[tuple[list[int], list[int] | None]], table: np.ndarray,
                 head: dict, position_offset: int, eps: float) -> None:
        # imported here: the head's BLAS limits know the BLAS libraries loaded when it is first imported
        from edgerank.runtime.backends.heads import bert_embeddings

        self.dest = dest
        self.work = dest / ".int8-static-work"
        self.work.mkdir()
        self.outputs: list[str] = []
        batches = {}
        for b, a in enumerate(range(0, len(sequences), CALIBRATION_ROWS)):
            rows = sequences[a: a + CALIBRATION_ROWS]
            lengths = np.array([len(ids) for ids, _ in rows])
            hidden = np.zeros((len(rows), int(lengths.max()), table.shape[1]), np.float32)
            for r, (ids, types) in enumerate(rows):
                hidden[r, : len(ids)] = bert_embeddings(np.asarray(table[np.asarray(ids)], np.float32), types, head,
                                                        position_offset, eps)
            batches[f"hidden_{b}"], batches[f"lengths_{b}"] = hidden, lengths
        np.savez(self.work / BATCHES, **batches)

    def add(self, fp32_layer: onnx.ModelProto, output: str) -> None:
        """Layer ``len(outputs)``'s fp32 graph, to be written quantized to ``output`` (relative to dest)."""
        onnx.save_model(fp32_layer, self.work / f"{len(self.outputs):04d}.onnx")
        self.outputs.append(output)

    def write(self) -> None:
        """Quantize every layer added, in a child process; the work folder goes either way."""
        try:
            (self.work / "outputs.txt").write_text("\n".join(str(self.dest / o) for o in self.outputs))
            done = subprocess.run([sys.executable, "-m", __name__, str(self.work)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"NNCF could not quantize the int8-static form: {done.stderr.strip()[-2000:]}")
        finally:
            shutil.rmtree(self.work, ignore_errors=True)


def _quantize_all(work: Path) -> None:
    """The child's job: each layer quantized on its inputs, which then move on through its fp32 graph."""
    import nncf
    import onnxruntime as ort

    from edgerank.runtime.cpu import default_threads
    from edgerank.runtime.engines import session_options

    nncf.set_log_level(logging.ERROR)
    with np.load(work / BATCHES) as z:
        batches = [layout.encoder_inputs(z[f"hidden_{b}"], z[f"lengths_{b}"]) for b in range(len(z.files) // 2)]
    for i, out in enumerate((work / "outputs.txt").read_text().splitlines()):
        model = onnx.load(work / f"{i:04d}.onnx")
        with contextlib.redirect_stdout(io.StringIO()):  # its progress bars, six a layer
            quantized = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(batches))
        onnx.save_model(quantized, out)
        sess = ort.InferenceSession(model.SerializeToString(), session_options(default_threads()),
                                    providers=["CPUExecutionProvider"])
        for feeds in batches:
            feeds[layout.HIDDEN] = sess.run([layout.HIDDEN_OUT], feeds)[0]


if __name__ == "__main__":
    _quantize_all(Path(sys.argv[1]))
