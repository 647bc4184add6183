"""Which of minilm-l6's projections cost the int4 form its nDCG: convert with one projection
type kept at 8 bits (MatMulNBits), score DL19 (43 queries, depth 100), nDCG@10 against fp32."""
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import edgerank
import edgerank.converters.onnx_export as ox
from edgerank.converters import convert
from edgerank.models.supply import resolve
from edgerank.data.judged import load_beir, load_run, SHARED_DATA
from edgerank.metrics import ndcg_at_k
DL19 = SHARED_DATA / "trec-dl19"
coll = load_beir(DL19); run = load_run(DL19 / "run.bm25.top100.trec")
qids = [q for q in run if q in coll.qrels]
def ndcg(art, **opt):
    out = []
    with edgerank.Reranker(art, pruning=False, **opt) as r:
        for q in qids:
            docs = [d for d, _ in run[q][:100]]
            s = r.score(coll.queries[q], [coll.corpus[d] for d in docs])
            order = [docs[i] for i in np.argsort(-s, kind="stable")]
            out.append(ndcg_at_k(order, coll.qrels[q], 10))
    return float(np.mean(out)), out
orig = ox._bits_picker
def picker_keep(sensitive):
    def bp(reader, quant, layer_prefix, notes):
        pick = orig(reader, quant, layer_prefix, notes)
        return lambda proj: 8 if quant == "int4" and any(proj == s or (s == "qkv" and proj.startswith("attention.self.")) for s in sensitive) else pick(proj)
    return bp
results = {}
src = resolve("minilm-l6")
variants = {"int4": [], **{name: [name] for name in sys.argv[1].split(",")}} if len(sys.argv) > 1 else {"int4": []}
tmp = Path(tempfile.mkdtemp())
fp32 = tmp / "fp32"; convert(src, "onnx", "fp32", fp32, verify=False, progress=False)
base, base_q = ndcg(fp32)
results["fp32"] = base
for name, keep in variants.items():
    ox._bits_picker = picker_keep(keep)
    art = tmp / name.replace(".", "_"); convert(src, "onnx", "int4", art, verify=False, progress=False)
    ox._bits_picker = orig
    m, per = ndcg(art, compute="int4")
    results[name] = m
    print(name, round(m, 4), "delta vs fp32", round(m - base, 4), "bytes", sum(f.stat().st_size for f in (art / "layers").glob("layer_??.onnx")), flush=True)
print(json.dumps(results))
