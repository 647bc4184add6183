"""Training recipes: how each of edgerank's own rerankers is made, as data.

``python -m edgerank.train --recipe NAME`` builds the recipe's training groups from
``../shared/data/train`` (``edgerank.data.training``), labels them with the teacher, and trains.
Both recipes share one labelled data set, cached under ``$EDGERANK_HOME/train-data``.
Budgets are sized for a 2-core laptop CPU (bench/RESULTS.md records the measured cost).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

# (source, path under the data root, queries sampled). WikiQA's Bing queries are the
# closest to web search; SQuAD gives volume; MedQuAD and SQuAD 2.0 add other domains and
# unanswerable-question hard negatives.
MIXED_SOURCES = (
    ("squad", "squad", 1200),
    ("wikiqa", "wikiqa-pairs", None),
    ("medquad", "medquad-pairs", 300),
    ("squad2", "squad2-dev-pairs", 300),
)
TEACHER = "minilm-l6"  # all-MiniLM-L6-v2, the strongest ranker obtainable here (DL19 0.642)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    config: dict  # TrainConfig fields other than data and out
    sources: tuple = MIXED_SOURCES
    negatives: int = 7
    teacher: str | None = TEACHER
    seed: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="edgerank-minilm-ce",
            description="cross-encoder from all-MiniLM-L6-v2's encoder plus a fresh classifier, full fine-tuning",
            # teacher temperature 0.1, not 0.05: DL19 nDCG@10 0.6263 against 0.6002, same data and
            # seed (bench/RESULTS.md §10.3)
            config=dict(base="minilm-l6", family="cross-encoder", loss="kl", teacher_temperature=0.1,
                        label_weight=0.2, adapter="full", steps=700, queries_per_step=8, group_size=8,
                        lr=1e-4, max_length=160, checkpoint_every=50),
        ),
        Recipe(
            name="edgerank-minilm-ce-early",
            description="edgerank-minilm-ce trained on so that its own head also ranks from layer 2 of 6 "
                        "(layer_weight: the readout progressive pruning uses), for pruned reranking",
            # teacher temperature 0.1, as its base: DL19 nDCG@10 0.6322 fp32 / 0.6232 int4 (RESULTS §10.4)
            config=dict(base="edgerank-minilm-ce", family="cross-encoder", loss="kl", teacher_temperature=0.1,
                        label_weight=0.2, adapter="full", steps=200, queries_per_step=8, group_size=8,
                        lr=5e-5, max_length=160, checkpoint_every=50, layer_weight=1.0, layer_min_depth=0.3),
        ),
        Recipe(
            name="edgerank-smollm2-rerank",
            description="yes/no LLM reranker (Qwen3-Reranker template) from SmolLM2-135M-Instruct: full "
                        "fine-tuning that also ranks from 30% depth, written as the base + a rank-32 SVD adapter",
            # Full fine-tuning learns faster than LoRA here (RESULTS §10.5), and its update, cut to
            # low rank, survives the int4 conversion that rounds a dense update away (§10.6).
            # Rank 32 in fp32: DL19 nDCG@10 0.4928 as int4, against 0.4810 at rank 24 in int8 and
            # 0.4381 at rank 12 in fp16 (§10.7).
            config=dict(base="smollm2-135m", family="qwen3-reranker", loss="kl", teacher_temperature=0.1,
                        label_weight=0.2, adapter="full", svd_rank=32, steps=1000, queries_per_step=4,
                        group_size=8, lr=3e-5, max_length=160, checkpoint_every=20, layer_weight=1.0,
                        layer_min_depth=0.3),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


def training_data(recipe: Recipe, data_root: Path | None = None, progress: bool = True) -> Path:
    """The recipe's labelled training groups, built and labelled once, then cached."""
    from edgerank.data.training import build_groups, label_groups, write_jsonl
    from edgerank.data.judged import SHARED_DATA
    from edgerank.models.pull import edgerank_home

    root = Path(data_root) if data_root else SHARED_DATA / "train"
    key = hashlib.sha256(json.dumps([recipe.sources, recipe.negatives, recipe.teacher, recipe.seed,
                                     str(root.resolve())]).encode()).hexdigest()[:12]
    path = edgerank_home() / "train-data" / f"groups-{key}.jsonl"
    if path.is_file():
        return path
    groups = []
    for n, (source, rel, limit) in enumerate(recipe.sources):
        groups += build_groups(source, root / rel, recipe.negatives, limit, recipe.seed + n)
    import random

    random.Random(recipe.seed).shuffle(groups)
    if recipe.teacher:
        groups = label_groups(groups, recipe.teacher, backend="reference", progress=progress)
    write_jsonl(groups, path)
    return path


def recipe_config(name: str, overrides: dict | None = None, data_root: Path | None = None):
    """The recipe's ``TrainConfig`` (its data built and labelled first if need be);
    ``overrides`` replace fields."""
    from edgerank.models.pull import trained_dir
    from edgerank.train.trainer import TrainConfig

    recipe = get_recipe(name)
    fields = {**recipe.config, "seed": recipe.seed, **dict(overrides or {})}
    fields.setdefault("data", str(training_data(recipe, data_root)))
    fields.setdefault("out", str(trained_dir(name)))
    return TrainConfig(**fields)

