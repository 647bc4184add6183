"""How well a decoder's int8-compute form ranks like its int4 form, by smoothing strength
and by which projections stay int4 (RESULTS §18.7).

    PYTHONPATH=. .venv/bin/python bench/int8_fit.py --model smollm2-135m --alpha 0.5,0.7,0.85 \\
        [--keep-int4 down_proj] [--json out.json]

Each setting is a full conversion to a temporary folder with ``converters/smoothing.ALPHA``
set (0 means not smoothed; ``--max-factor`` bounds the factors) and, with ``--keep-int4``, the converter's projection picker
patched so the named projections stay ``MatMulNBits`` int4 inside the int8 form; printed:
the form's fit (Spearman against the int4 form on the built-in sample) and the layer-0
probe times of both forms.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import edgerank.converters.onnx_export as onnx_export
import edgerank.converters.smoothing as smoothing
from edgerank.models.supply import resolve
from edgerank.converters import convert


def fit(model: str, alpha: float, keep: list[str], max_factor: float | None = None) -> dict:
    picker = onnx_export._bits_picker

    def patched(reader, quant, prefix, notes):
        pick = picker(reader, quant, prefix, notes)
        return lambda proj: 4 if quant == "int8" and proj.split(".")[-1] in keep else pick(proj)

    onnx_export._bits_picker, smoothing.ALPHA = patched, alpha
    if max_factor is not None:
        smoothing.MAX_FACTOR = max_factor
    smooth = onnx_export.smooth
    if alpha == 0:
        onnx_export.smooth = lambda w, *a, **k: w
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "art"
            convert(resolve(model), "onnx", "int4", out, verify=False, progress=False)
            compute = json.loads((out / "manifest.json").read_text())["compute"]
    finally:
        onnx_export._bits_picker, onnx_export.smooth = picker, smooth
    return {"alpha": alpha, "keep_int4": keep, "max_factor": smoothing.MAX_FACTOR, "spearman": compute["fit"]["int8"]["spearman"],
            "probe_ms": compute["measured"]["ms"], "cpu": compute["measured"]["cpu"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--alpha", default="0.7", help="comma-separated; 0: not smoothed")
    ap.add_argument("--keep-int4", default="", help="comma-separated projection names, e.g. down_proj")
    ap.add_argument("--max-factor", type=float, default=None, help="smoothing factors' bound (default: the module's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    keep = [k for k in args.keep_int4.split(",") if k]
    rows = []
    for alpha in map(float, args.alpha.split(",")):
        rows.append(fit(args.model, alpha, keep, args.max_factor))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
