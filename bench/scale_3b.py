"""The 3B-shaped scale run: Llama-3.2-3B's real shape with random bf16 weights.

    python bench/scale_3b.py make   --out /tmp/l3b --tokenizer-from ARTIFACT_OR_HF_FOLDER
    python -m edgerank.converters /tmp/l3b --to onnx --quant int4 --out /tmp/l3b-int4 --model-spec zeroshot-chatml --no-verify
    python -m edgerank.converters /tmp/l3b --to gguf --quant q4_k_m --out /tmp/l3b.gguf --model-spec zeroshot-chatml --no-verify
    python bench/scale_3b.py run    --artifact /tmp/l3b-int4 [--gguf /tmp/l3b.gguf] --json scale.json

``make`` writes one safetensors shard per layer (never the whole model in memory).
``run`` ranks one query with 20 candidates of about 200 tokens each, each configuration in
its own process (peak RSS from the kernel's ru_maxrss): edgerank's int4 and bf16 forms
under ``--budget-mb`` (1,500 by default: both stream their layers), and with
``--configs``, every int4 layer resident, and llama.cpp on the Q4_K_M GGUF. The weights
are random, so only latency and memory mean anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

LLAMA_32_3B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
}


def make(out: Path, tokenizer_from: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    c = LLAMA_32_3B
    out.mkdir(parents=True, exist_ok=False)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    H, F, D = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    save_file({"model.embed_tokens.weight": rand(c["vocab_size"], H),
               "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}, out / "model-embed.safetensors")
    for i in tqdm(range(c["num_hidden_layers"]), desc="random layers", unit="layer"):
        p = f"model.layers.{i}."
        save_file({p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                   p + "self_attn.q_proj.weight": rand(q, H), p + "self_attn.k_proj.weight": rand(kv, H),
                   p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, q),
                   p + "mlp.gate_proj.weight": rand(F, H), p + "mlp.up_proj.weight": rand(F, H),
                   p + "mlp.down_proj.weight": rand(H, F)}, out / f"model-layer-{i:02d}.safetensors")
    (out / "config.json").write_text(json.dumps(c, indent=1))
    shutil.copyfile(tokenizer_from / "tokenizer.json", out / "tokenizer.json")
    (out / "edgerank.json").write_text(json.dumps({"family": "zeroshot-chatml"}))


def run(artifact: Path, gguf: Path | None, budget_mb: float, out: Path | None, only: list[str] | None = None) -> dict:
    from edgerank.bench.runner import Worker, machine

    words = ("the immune system responds to a vaccine by training memory cells that remember the "
             "antigen so a later infection is cleared faster ").split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(150)) for i in range(20)]  # ~200 tokens each
    query = "how do vaccines train the immune system"
    edgerank = {"model": str(artifact), "backend": "edgerank"}
    configs = {
        "edgerank-int4": {**edgerank, "compute": "int4", "max_memory_mb": budget_mb},
        "edgerank-bf16": {**edgerank, "compute": "bf16", "max_memory_mb": budget_mb},
        "edgerank-resident": {**edgerank, "compute": "int4", "stream_weights": False},
        "llamacpp-q4_k_m": {"model": str(gguf), "backend": "llamacpp", "family": "zeroshot-chatml"},
    }
    only = only or ["edgerank-int4", "edgerank-bf16"] + (["llamacpp-q4_k_m"] if gguf else [])
    report = {"machine": machine(), "candidates": len(docs), "budget_mb": budget_mb, "configs": {}}
    for name, spec in configs.items():
        if name not in only:
            continue
        w = Worker(name, spec)
        r = w.rank(query, docs, top_k=10)
        bye = w.stop()
        extra = r.get("extra") or {}
        report["configs"][name] = {
            "latency_s": r["latency_s"], "latency_per_candidate_s": r["latency_s"] / len(docs),
            "peak_rss_mb": bye["max_rss_mb"], "baseline_rss_mb": w.hello["baseline_rss_mb"],
            "load_s": w.hello["load_s"], "tokens": extra.get("candidate_tokens"),
            "compute": (extra.get("compute") or {}).get("form"), "stream_weights": extra.get("stream_weights"),
            "io_wait_s": extra.get("io_wait_s"), "layer_load_s": extra.get("layer_load_s"),
        }
        print(name, json.dumps(report["configs"][name]), flush=True)
    if out:
        out.write_text(json.dumps(report, indent=1))
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--tokenizer-from", type=Path, required=True, help="a folder holding a tokenizer.json")
    r = sub.add_parser("run")
    r.add_argument("--artifact", type=Path, required=True)
    r.add_argument("--gguf", type=Path, default=None, help="the Q4_K_M GGUF, for the llama.cpp row")
    r.add_argument("--budget-mb", type=float, default=1500.0)
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--configs", default=None, help="comma-separated subset")
    args = p.parse_args()
    if args.cmd == "make":
        make(args.out, args.tokenizer_from)
    else:
        run(args.artifact, args.gguf, args.budget_mb, args.json, args.configs.split(",") if args.configs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
