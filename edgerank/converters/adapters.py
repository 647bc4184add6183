"""LoRA adapters: attach them for training, store them small, merge them exactly.

A full fine-tune becomes an adapter too (:func:`svd_update`): the best rank-r
approximation of each projection's update, so its 4-bit artifact can keep the update
beside the quantized base instead of rounding it away.

An adapter file is a safetensors file with, per adapted linear layer ``NAME`` (its
weight's key in the base model's state dict), ``NAME.lora_A`` ``[r, in]`` and
``NAME.lora_B`` ``[out, r]``, plus metadata ``{"r", "alpha", "base", "family"}``.
Merging computes ``W + alpha / r * B @ A`` as a float64 sum of ``r`` outer products, in a
fixed order: the result is bit-identical on every machine, so a merged model can be
verified by checksum.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: the converters read adapters without it
    import torch

ADAPTER_FILE = "adapter.safetensors"  # beside a LoRA-trained model's merged weights
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENCODER_TARGETS = ("query", "key", "value", "dense")
ADAPTER_DTYPES = ("float32", "float16", "int8")  # how an adapter file stores A and B


def attach_lora(module: torch.nn.Module, kind: str, n_layers: int, r: int, alpha: int,
                upper_layers: int | None = None, dropout: float = 0.0) -> list[str]:
    """Inject LoRA into ``module`` in place (peft); only the adapters stay trainable.

    ``upper_layers`` limits the adapters to the last N transformer layers (the lower ones
    then run without autograd); None or 0 adapts every layer. Returns the adapted layers'
    names within ``module``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    layers = list(range(max(0, n_layers - upper_layers), n_layers)) if upper_layers else None
    decoder = kind == "decoder"
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
        target_modules=list(DECODER_TARGETS if decoder else ENCODER_TARGETS),
        layers_to_transform=layers, layers_pattern=None if layers is None else ("layers" if decoder else "layer"),
    )
    for p in module.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, module)
    names = []
    for name, sub in module.named_modules():
        if hasattr(sub, "lora_A") and "default" in getattr(sub, "lora_A", {}):
            names.append(name)
            for p in (sub.lora_A["default"].weight, sub.lora_B["default"].weight):
                p.requires_grad_(True)
    if not names:
        raise ValueError("no layer of this model matched the LoRA target modules")
    return names


def save_adapter(module: torch.nn.Module, prefix: str, path: Path, r: int, alpha: int,
                 base: str, family: str) -> None:
    """Write ``module``'s LoRA weights as an adapter file; ``prefix`` maps its names to the
    base model's state-dict keys (``"model."`` for a decoder inside ``*ForCausalLM``)."""
    pairs = {}
    for name, sub in module.named_modules():
        if hasattr(sub, "lora_A") and "default" in getattr(sub, "lora_A", {}):
            pairs[f"{prefix}{name}.weight"] = (sub.lora_A["default"].weight.detach().float().cpu().numpy(),
                                               sub.lora_B["default"].weight.detach().float().cpu().numpy())
    write_adapter(pairs, path, r, alpha, {"base": base, "family": family})


def write_adapter(pairs: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, r: int, alpha: int,
                  metadata: dict[str, str], dtype: str = "float32") -> None:
    """Write ``{weight key: (A [r, in], B [out, r])}`` as an adapter file, atomically, its
    tensors stored as ``dtype``: float32, float16 (half the size) or int8 (a quarter:
    symmetric, one float32 scale per rank component, in ``NAME.lora_A.scale`` [r] and
    ``NAME.lora_B.scale`` [r], so each of the r terms of ``B @ A`` keeps its own range)."""
    from safetensors.numpy import save_file

    if dtype not in ADAPTER_DTYPES:
        raise ValueError(f"an adapter is stored as one of {', '.join(ADAPTER_DTYPES)}, not {dtype!r}")
    tensors = {}
    for key, (a, b) in pairs.items():
        if dtype == "int8":
            tensors[f"{key}.lora_A"], tensors[f"{key}.lora_A.scale"] = _int8_rows(np.asarray(a))
            qb, tensors[f"{key}.lora_B.scale"] = _int8_rows(np.asarray(b).T)
            tensors[f"{key}.lora_B"] = np.ascontiguousarray(qb.T)
        else:
            tensors[f"{key}.lora_A"] = np.ascontiguousarray(a, dtype=dtype)
            tensors[f"{key}.lora_B"] = np.ascontiguousarray(b, dtype=dtype)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"r": str(r), "alpha": str(alpha), **metadata})
    tmp.replace(path)


def _int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: ``q * scale[:, None]`` approximates ``x``."""
    x = x.astype(np.float64)
    peak = np.abs(x).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def svd_update(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int,
               targets: tuple[str, ...]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int, float]:
    """Each target projection's update ``tuned - base`` cut to its best rank-r approximation
    (truncated SVD, Eckart-Young), as adapter pairs ``(A [r, in], B [out, r])`` with ``B @ A``
    that approximation (so alpha = r, scale 1). r is ``rank``, or the smallest projection's
    side where that is less. Returns the pairs, r, and the share of the updates' squared
    Frobenius norm they keep. Other tensors (norms, embeddings) are not carried."""
    svds = {}
    for key in sorted(tuned):
        if not (key.endswith(".weight") and key.rsplit(".", 2)[-2] in targets):
            continue
        if key not in base or base[key].shape != tuned[key].shape:
            raise ValueError(f"{key} is not in the base model, or has another shape: wrong base?")
        delta = tuned[key].detach().cpu().double().numpy() - base[key].detach().cpu().double().numpy()
        svds[key] = np.linalg.svd(delta, full_matrices=False)
    if not svds:
        raise ValueError(f"no weight of the tuned model is one of the projections {', '.join(targets)}")
    r = min(rank, *(len(s) for _, s, _ in svds.values()))
    pairs = {key: (vt[:r], u[:, :r] * s[:r]) for key, (u, s, vt) in svds.items()}
    total = sum(float(np.sum(s ** 2)) for _, s, _ in svds.values())
    kept = sum(float(np.sum(s[:r] ** 2)) for _, s, _ in svds.values())
    return pairs, r, (kept / total if total else 1.0)


def read_adapter(path: str | Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """``{weight key: (A, B)}`` and the metadata of an adapter file (int8 tensors come
    back scaled, as float32; float32 and float16 as stored)."""
    from edgerank.converters.safetensors_file import SafetensorsFile

    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    f = SafetensorsFile(path)
    meta, keys = f.metadata, set(f.keys())
    for k in sorted(keys):
        if k.endswith(".lora_A"):
            base = k[: -len(".lora_A")]
            if base + ".lora_B" not in keys:
                raise ValueError(f"{path}: {base} has lora_A but no lora_B")
            a, b = f.get(k), f.get(base + ".lora_B")
            if a.dtype == np.int8 or b.dtype == np.int8:
                if not {k + ".scale", base + ".lora_B.scale"} <= keys:
                    raise ValueError(f"{path}: {base} is stored as int8 but has no scales")
                a = a.astype(np.float32) * f.get(k + ".scale")[:, None]
                b = b.astype(np.float32) * f.get(base + ".lora_B.scale")[None, :]
            pairs[base] = (a, b)
    for need in ("r", "alpha"):
        if need not in meta:
            raise ValueError(f"{path} is not an edgerank adapter: metadata {need!r} is missing")
    return pairs, meta


def adapter_file(folder: str | Path) -> Path | None:
    """The LoRA adapter a trained HF folder carries (written by ``edgerank.train.trainer``), if any."""
    path = Path(folder) / ADAPTER_FILE
    return path if Path(folder).is_dir() and path.is_file() else None


def lora_updates(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{weight key: (A as float32, alpha / r * B in float64)}``: each update is ``B @ A``,
    whatever dtype the file stores. The merge below and the converters (which keep the
    update unmerged) both read this."""
    pairs, meta = read_adapter(path)
    scale = float(meta["alpha"]) / float(meta["r"])
    return {key: (a.astype(np.float32, copy=False), b.astype(np.float64) * scale) for key, (a, b) in pairs.items()}


def merge_lora(state: dict[str, torch.Tensor], adapter: str | Path) -> dict[str, torch.Tensor]:
    """The base state dict with the adapter merged in (exact, order-fixed float64 sums)."""
    import torch

    merged = dict(state)
    for key, (a, b64) in lora_updates(adapter).items():
        if key not in state:
            raise ValueError(f"{adapter} adapts {key}, which the base model does not have: wrong base?")
        w = state[key].detach().cpu().numpy().astype(np.float64)
        if w.shape != (b64.shape[0], a.shape[1]):
            raise ValueError(f"{adapter}: {key} is {w.shape} in the base but {b64.shape[0]}x{a.shape[1]} in the adapter")
        a64 = a.astype(np.float64)
        for k in range(a.shape[0]):  # fixed summation order: no BLAS, same bits everywhere
            w += np.multiply.outer(b64[:, k], a64[k])
        merged[key] = torch.from_numpy(w.astype(np.float32))
    return merged


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in sorted name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
