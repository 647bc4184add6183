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
pairs (:func:`calibration_sequences`: each sample query with another query's passages, so
the pairs the fit check scores are not the ones calibrated on) carried from layer to layer
through the fp32 graphs. Decoders get no such form: int8 activations, even per token and
smoothed, ranked SmolLM2 unlike its own form (Spearman 0.877; speed.md §18.4-18.8).

Needs the ``openvino`` extra (OpenVINO and NNCF); without it the artifact has no such form.
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import onnx
import onnxruntime as ort

from edgerank.runtime import layout
from edgerank.runtime.backends.heads import bert_embeddings
from edgerank.runtime.cpu import default_threads
from edgerank.runtime.engines import session_options
from edgerank.runtime.extras import installed, missing

STATIC_FORM = "int8-static"
CALIBRATION_ROWS = 8  # sequences per calibration batch (one NNCF sample each)


def can_write() -> bool:
    """Whether this Python can write the form: NNCF and OpenVINO installed (the ``openvino`` extra)."""
    return not missing("openvino") and installed("nncf")


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


class EncoderCalibration:
    """The calibration sequences' hidden states in batches of :data:`CALIBRATION_ROWS`,
    carried from layer to layer through the fp32 layer graphs."""

    def __init__(self, sequences: list[tuple[list[int], list[int] | None]], table: np.ndarray, head: dict,
                 position_offset: int, eps: float) -> None:
        self.batches: list[dict[str, np.ndarray]] = []
        for a in range(0, len(sequences), CALIBRATION_ROWS):
            rows = sequences[a: a + CALIBRATION_ROWS]
            lengths = np.array([len(ids) for ids, _ in rows])
            hidden = np.zeros((len(rows), int(lengths.max()), table.shape[1]), np.float32)
            for r, (ids, types) in enumerate(rows):
                hidden[r, : len(ids)] = bert_embeddings(np.asarray(table[np.asarray(ids)], np.float32), types, head,
                                                        position_offset, eps)
            self.batches.append(layout.encoder_inputs(hidden, lengths))

    def quantize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` (one fp32 encoder layer) quantized by NNCF on this layer's inputs, as a
        QDQ ONNX graph; then the batches move on through the fp32 layer."""
        import nncf

        nncf.set_log_level(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress bars, six a layer, inside the converter's
            quantized = nncf.quantize(model, nncf.Dataset(self.batches), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(self.batches))
        sess = ort.InferenceSession(model.SerializeToString(), session_options(default_threads()),
                                    providers=["CPUExecutionProvider"])
        for feeds in self.batches:
            feeds[layout.HIDDEN] = sess.run([layout.HIDDEN_OUT], feeds)[0]
        return quantized
