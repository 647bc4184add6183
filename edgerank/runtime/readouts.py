"""Per-layer readouts: small linear maps, fitted by ``python -m edgerank.calibrate MODEL
--fit-readouts``, that predict a model's own final score from one layer's pooled state.

The runtime uses them at a pruning check instead of the model's own head, which on most
models does not rank until the last layers (bench/RESULTS.md §5, §10.4). They only ever
score candidates at a check; the final score of a candidate that runs to the last layer
still comes from the model's head, so readouts change what is pruned, never a final score.

File (``layout.READOUTS``, listed and checksummed in the manifest like every other file)::

    weight [L, F] fp32   row l: the readout before layer l (row 0 unused: no check there)
    bias   [L]    fp32
    fitted [L]    bool   which rows hold a fitted readout
    digest        str    ``model_digest`` of the artifact the readouts were fitted on
    features      str    ``state`` (decoders: RMS-normalised last token; cross-encoders:
                         [CLS]) or ``biencoder`` ([d*q, d, q] of unit-normalised mean-pooled
                         candidate d and query q)
    link          str    ``identity`` or ``sigmoid`` (the fit was on the final logit)

The digest ties the file to the model's weights: a readout file copied from another model
(or left behind by a retrained one) is refused at load with ``ModelFormatError``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from edgerank.errors import ModelFormatError
from edgerank.runtime import layout
from edgerank.runtime.artifact import Artifact

FEATURES = ("state", "biencoder")
LINKS = ("identity", "sigmoid")


def model_digest(artifact: Artifact) -> str:
    """A digest of the model's weights, from the sha256 sums the manifest already holds
    (embedding table, head, every layer): what a readout file must have been fitted on."""
    files = artifact.manifest["files"]
    parts = [layout.EMBED, layout.HEAD, *artifact.manifest["layers"]]
    return hashlib.sha256("\n".join(f"{p} {files[p]['sha256']}" for p in parts).encode()).hexdigest()


def features(kind: str, pooled: np.ndarray, query: np.ndarray | None = None) -> np.ndarray:
    """The readout's input features ``[n, F]`` from pooled states ``[n, H]`` (and, for
    bi-encoders, the query's pooled state ``[H]``)."""
    x = np.asarray(pooled, dtype=np.float32)
    if kind == "state":
        # Decoder residual streams grow by orders of magnitude across layers, with a few
        # outlier dimensions; the final RMSNorm is what makes the last one readable, so
        # every layer's state is read RMS-normalised (scale-free), as the head reads it.
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    if kind == "biencoder":
        if query is None:
            raise ValueError("bi-encoder readouts need the query's pooled state")
        d = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        q = np.asarray(query, dtype=np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        # d*q sums to the layer's own cosine; a weight per dimension re-weights it towards
        # the final cosine (a diagonal bilinear form). d and q alone carry the parts of the
        # score level that do not factor through the product.
        return np.concatenate([d * q, d, np.broadcast_to(q, d.shape)], axis=-1)
    raise ValueError(f"unknown readout features {kind!r}")


def feature_width(kind: str, hidden: int) -> int:
    return 3 * hidden if kind == "biencoder" else hidden


class Readouts:
    """An artifact's fitted readouts, checked against the artifact's model at load."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, fitted: np.ndarray, kind: str, link: str) -> None:
        self.weight, self.bias, self.fitted, self.kind, self.link = weight, bias, fitted, kind, link

    @classmethod
    def load(cls, artifact: Artifact) -> "Readouts | None":
        """The artifact's readouts, or None if it has none. A file fitted on another model
        (other digest, or shapes that do not fit this one) is a ``ModelFormatError``."""
        if layout.READOUTS not in artifact.manifest.get("files", {}):
            return None
        path = artifact.path / layout.READOUTS
        try:
            with np.load(path, allow_pickle=False) as z:
                weight, bias = z["weight"].astype(np.float32), z["bias"].astype(np.float32)
                fitted = z["fitted"].astype(bool)
                digest, kind, link = str(z["digest"]), str(z["features"]), str(z["link"])
        except (OSError, KeyError, ValueError) as e:
            raise ModelFormatError(f"{path} is not a readout file: {e}") from e
        where = f"{path}: "
        if digest != model_digest(artifact):
            raise ModelFormatError(f"{where}fitted on another model (digest {digest[:12]}, this artifact's "
                                   f"{model_digest(artifact)[:12]}); refit with calibrate --fit-readouts")
        if kind not in FEATURES or link not in LINKS:
            raise ModelFormatError(f"{where}unknown features {kind!r} or link {link!r}")
        L, width = artifact.n_layers, feature_width(kind, artifact.dims["hidden"])
        if weight.shape != (L, width) or bias.shape != (L,) or fitted.shape != (L,):
            raise ModelFormatError(f"{where}shapes weight {weight.shape}, bias {bias.shape}, fitted "
                                   f"{fitted.shape} do not fit this model ({L} layers, {width} features)")
        return cls(weight, bias, fitted, kind, link)

    def has(self, layer: int) -> bool:
        return 0 <= layer < len(self.fitted) and bool(self.fitted[layer])

    def scores(self, layer: int, pooled: np.ndarray, query: np.ndarray | None = None) -> np.ndarray:
        """Predicted final scores of candidates from their pooled states before ``layer``."""
        z = features(self.kind, pooled, query).astype(np.float64) @ self.weight[layer] + self.bias[layer]
        return 1.0 / (1.0 + np.exp(-z)) if self.link == "sigmoid" else z


def save(path, weight: np.ndarray, bias: np.ndarray, fitted: np.ndarray, digest: str, kind: str, link: str) -> None:
    """Write a readout file (the fitting tool's output; the reader is :meth:`Readouts.load`)."""
    with open(path, "wb") as f:
        np.savez(f, weight=weight.astype(np.float32), bias=bias.astype(np.float32), fitted=fitted.astype(bool),
                 digest=np.array(digest), features=np.array(kind), link=np.array(link))
