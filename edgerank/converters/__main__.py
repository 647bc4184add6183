"""``python -m edgerank.converters SRC --to gguf --quant q4_k_m --out DEST``: convert and verify."""

from __future__ import annotations

import argparse
import sys

from edgerank.cli import check_output, exits_on, format_table
from edgerank.converters import FORMATS, OutputExistsError, check_request, convert
from edgerank.models.supply import input_paths, resolve

# Below this Spearman (artifact against its source, on the verification pairs) the artifact
# ranks unlike the model it came from. Sound 4-bit conversions measure 0.83-1.00 here; a
# full fine-tune of a 4-bit base converted to int4 measured 0.18 (bench/RESULTS.md §10.5).
MIN_SPEARMAN = 0.8


def fidelity_warning(report: dict, out: str) -> str | None:
    """A one-line warning when a verified conversion does not rank like its source."""
    rho = report.get("spearman")
    if rho is None or rho >= MIN_SPEARMAN:
        return None
    return (f"warning: {out} was written, but it ranks unlike its source (Spearman {rho:.3f} over "
            f"{report['pairs']} pairs, below {MIN_SPEARMAN}). Quantization erased what the model "
            f"learned, as when a full fine-tune of a 4-bit base rounds back to it; train it with --svd-rank "
            f"(python -m edgerank.train), or try a wider --quant (int8, q8_0)")


@exits_on(OutputExistsError, ValueError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgerank.converters", description=__doc__)
    p.add_argument("src", help="HF folder, .gguf file, or built-in model name")
    p.add_argument("--to", required=True, choices=sorted(FORMATS),
                   help="gguf (llama.cpp), onnx (the edgerank artifact) or onnx-graph (the whole model as one "
                        "standard ONNX graph, for any ONNX runtime; needs the reference extra)")
    p.add_argument("--quant", default=None,
                   help="gguf: q4_k_m, q4_0, q4_1, q8_0 or f16; onnx: int4 (with an int8-compute form beside it), "
                        "int8 or fp32; onnx-graph: fp32 or int8 (quantize_dynamic). Default: a quantised GGUF "
                        "source's own grid (Q4_1 stays q4_1), else q4_k_m (gguf), int4 (onnx) or int8 (onnx-graph)")
    p.add_argument("--out", required=True, help="output file (gguf) or folder (onnx, onnx-graph), written atomically")
    p.add_argument("--model-spec", dest="family", default=None, help="reranker family (edgerank/runtime/specs.py)")
    p.add_argument("--instruction", default=None,
                   help="gguf: the instruction written into the rerank template llama-server uses "
                        "(default: the family's)")
    p.add_argument("--rank-readout", action=argparse.BooleanOptionalAction, default=None,
                   help="gguf, llama/qwen2 yes/no rerankers: rotate the weights so that llama-server --reranking "
                        "returns the model's yes-minus-no logit (default: yes, unless a quantised source would be "
                        "re-rounded onto a 4-bit grid)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip scoring 64 pairs against the full-precision source (Spearman, max |diff|)")
    args = p.parse_args(argv)
    check_output(args.out, *input_paths(args.src, cache=False), folder=True, parents=True)  # a built-in's folders
    check_request(args.src, args.to, args.quant, args.out, args.force, args.instruction)  # before a pull
    report = convert(resolve(args.src, family=args.family), args.to, args.quant, args.out, force=args.force,
                     verify=args.verify, instruction=args.instruction, rank_readout=args.rank_readout)
    rows = []
    for key in ("source_quant", "size_bytes", "source_size_bytes", "seconds", "verify_seconds", "peak_rss_mb",
                "pairs", "reference", "spearman", "pearson", "kendall_tau_b", "topk_agreement", "max_abs_diff",
                "diff_over_spread", "relevance_score", "rank_readout"):
        if report.get(key) is not None:
            v = report[key]
            rows.append([key, f"{v:.4f}" if isinstance(v, float) else str(v)])
    rows += [["fallback", f"{name}: {why}"] for name, why in report.get("fallbacks", {}).items()]
    if "int8_form" in report:  # an int4 artifact's int8-compute layers, checked the same way
        f = report["int8_form"]
        rows.append(["int8 form", f"spearman {f['spearman']:.4f}, kendall_tau_b {f['kendall_tau_b']:.4f}, "
                                  f"max_abs_diff {f['max_abs_diff']:.4f}"])
    if "compute" in report:
        c = report["compute"]
        if c.get("fit"):  # each other form against the own one on the sample (runtime.compute.usable)
            rows.append(["forms' fit", ", ".join(f"{form} {f['spearman']:.4f}{'' if f['fit'] else ' (unfit)'}"
                                                 for form, f in c["fit"].items()) + " (Spearman against own form)"])
        if c.get("how"):  # chosen by rule, nothing timed (an emulated CPU: edgerank.runtime.compute.by_rule)
            rows.append(["compute form", f"runs {c['fastest']} on this CPU ({c['how']}, not timed)"])
        else:
            rows.append(["layer 0 ms", ", ".join(f"{form} {ms:.1f}" for form, ms in c["ms"].items())
                         + f" ({c['threads']} threads): runs {c['fastest']} on this CPU"])
    print(f"{args.src} -> {args.out} ({args.to} {report.get('quant', args.quant)})")
    print(format_table(["", ""], rows))
    for line in report.get("warnings", []):
        print(f"warning: {line}", file=sys.stderr)
    warning = fidelity_warning(report, args.out)
    if warning:
        print(warning, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
