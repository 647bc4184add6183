"""``python -m edgerank.train``: fine-tune a reranker on the reference (torch) path.

    python -m edgerank.train --recipe edgerank-minilm-ce          # a recipe from edgerank/train/recipes.py
    python -m edgerank.train --base smollm2-135m --family qwen3-reranker \\
        --data groups.jsonl --loss kl --adapter lora --lora-upper 10 --steps 300 --out DIR

The model is trained exactly as it is scored: ``encode_pairs`` applies the family's
template and truncation, ``ReferenceBackend.head_outputs`` runs the forward pass, and the
family's ``ScoreFormula.logit`` (yes/no logit difference, classifier logit) is what the
losses see. For decoders, each query's template prefix (system prompt, instruction,
query: about half of every pair's tokens) runs once and its candidates attend to its keys
and values, as in the layer-wise runtime; outputs and gradients are those of full pairs.
Output is a Hugging Face folder (``edgerank.json`` names its family) that the converters
and every backend take as input; a LoRA run also leaves its small adapter file.

Runs are reproducible (seeded; the config is saved beside the output) and resumable: a
checkpoint is written atomically every ``checkpoint_every`` steps into
``.NAME.partial/`` beside the output, and re-running the same command continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerank.runtime.extras import require

require("train", "python -m edgerank.train")

import torch  # noqa: E402
from tqdm.auto import tqdm

from edgerank.converters.adapters import ADAPTER_DTYPES, ADAPTER_FILE
from edgerank.converters.merge import export_merged, save_model
from edgerank.models.supply import resolve
from edgerank.data.training import candidates, labels, read_groups
from edgerank.cli import check_output
from edgerank.errors import is_int, is_number
from edgerank.runtime.tokenization import encode_pairs

LOSSES = ("kl", "bce", "ranknet", "margin")


def _opt(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None) -> Any:
    """A ``TrainConfig`` field whose ``help`` (and ``choices``) also become its command-line flag's."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """One training run. Saved as ``train_config.json`` next to the output."""

    base: str = _opt(help="the starting point: built-in name, HF folder or GGUF")
    family: str = _opt(help="the spec the trained model is scored with (qwen3-reranker, cross-encoder, ...)")
    data: str = _opt(help="training JSONL from python -m edgerank.data (kl needs teacher_scores)")
    out: str = _opt(help="output folder (an HF folder the converters take)")
    loss: str = _opt("kl", "kl: listwise distillation from teacher_scores; bce: labels; "
                     "ranknet / margin: pairwise on labels", LOSSES)
    label_weight: float = _opt(0.0, "adds label_weight x BCE on the binary labels")
    teacher_temperature: float = _opt(1.0, "softmax temperature of the teacher's scores (kl)")
    margin: float = _opt(1.0, "the hinge margin of --loss margin")
    # Early-layer ranking (for the pruning runtime): adds layer_weight * the mean of the
    # same loss on the model's own head read from the hidden state entering each layer
    # from layer_min_depth of the depth on, as the runtime scores candidates before pruning.
    layer_weight: float = _opt(0.0, "adds layer_weight x the same loss on the head read before each "
                               "layer from --layer-min-depth on, so early layers rank (for pruning)")
    layer_min_depth: float = _opt(0.3, "first layer of --layer-weight, as a fraction of the depth, in (0, 1)")
    adapter: str = _opt("full", "full fine-tuning, or LoRA adapters (merged into the output)", ("full", "lora"))
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_upper: int | None = _opt(None, "LoRA on the last N layers only (0 or unset: all)")
    svd_rank: int | None = _opt(None, "full fine-tuning of an LLM: write the update as its best rank-N "
                                "approximation, an adapter beside the base weights, so that 4-bit "
                                "artifacts keep it instead of rounding it away (unset: the dense model)")
    svd_dtype: str = _opt("float32", "how --svd-rank's adapter is stored (float16: half the size, "
                          "int8: a quarter, one scale per rank component)",
                          ADAPTER_DTYPES)
    steps: int = _opt(1000, "optimizer steps")
    queries_per_step: int = _opt(8, "query groups per step")
    group_size: int = _opt(8, "candidates per query (the positive first, if any)")
    grad_accum: int = _opt(1, "micro-batches of --queries-per-step groups whose gradients add up to one step")
    lr: float = _opt(2e-5, "peak learning rate (AdamW; linear warm-up, then linear decay)")
    warmup: float = _opt(0.1, "fraction of steps with a linear warm-up, in [0, 1)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    max_length: int = _opt(256, "tokens per pair; longer documents are truncated")
    seed: int = _opt(0, "seed of sampling, initialisation and dropout")
    checkpoint_every: int = _opt(50, "steps between checkpoints (the run resumes from the last one)")
    device: str | None = _opt(None, "cuda when present, else cpu")
    precision: str = _opt("fp32", "bf16 autocasts the forward pass (weights stay fp32): on CUDA, or on a "
                          "CPU with native bf16 (AVX512-BF16 or AMX)", ("fp32", "bf16"))
    qlora: bool = _opt(False, "CUDA + bitsandbytes: 4-bit frozen base under the LoRA adapters")

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.adapter not in ("full", "lora"):
            raise ValueError(f"adapter must be 'full' or 'lora', not {self.adapter!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")
        if self.qlora and self.adapter != "lora":
            raise ValueError("qlora trains LoRA adapters: pass adapter='lora'")
        if self.svd_rank is not None:
            from edgerank.runtime.specs import get_spec

            if self.adapter != "full" or get_spec(self.family).kind != "decoder":
                raise ValueError("svd_rank cuts a full fine-tune of an LLM (adapter='full', a decoder family) "
                                 "to low rank; LoRA is low-rank already")
            if not is_int(self.svd_rank) or self.svd_rank < 1:
                raise ValueError(f"svd_rank must be an integer of at least 1, not {self.svd_rank!r}")
        if self.svd_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"svd_dtype must be one of {', '.join(ADAPTER_DTYPES)}, not {self.svd_dtype!r}")
        if self.svd_dtype != "float32" and self.svd_rank is None:
            raise ValueError("svd_dtype stores --svd-rank's adapter: give svd_rank too")
        for name in ("steps", "queries_per_step", "group_size", "grad_accum", "max_length",
                     "checkpoint_every", "lora_r"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer of at least 1, not {getattr(self, name)!r}")
        for name in ("lr", "teacher_temperature", "lora_alpha"):
            if not is_number(getattr(self, name)) or not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a positive number, not {getattr(self, name)!r}")
        for name in ("label_weight", "margin", "weight_decay"):
            if not is_number(getattr(self, name)) or not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a number >= 0, not {getattr(self, name)!r}")
        if not is_number(self.warmup) or not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps, in [0, 1), not {self.warmup!r}")
        if self.lora_upper is not None and (not is_int(self.lora_upper) or self.lora_upper < 0):
            raise ValueError(f"lora_upper must be a count of layers >= 0, not {self.lora_upper!r}")
        if self.layer_weight < 0 or not 0.0 < self.layer_min_depth < 1.0:
            raise ValueError("layer_weight must be >= 0 and layer_min_depth within (0, 1)")
        if self.group_size < 2 and self.loss != "bce":
            raise ValueError(f"loss {self.loss!r} compares candidates: group_size must be at least 2")


# Fields that shape only how the trained model is written, not the run: a checkpoint
# resumes (or exports) under any value of them.
EXPORT_FIELDS = ("svd_rank", "svd_dtype")


LORA_FIELDS = ("lora_r", "lora_alpha", "lora_upper")  # unused by a full fine-tune


def _same_run(saved: dict, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's saved config is ``cfg``'s run (export-only fields aside, and
    the LoRA fields of a full fine-tune, which it never reads)."""
    def run(d: dict) -> dict:
        unused = EXPORT_FIELDS + (LORA_FIELDS if d.get("adapter") == "full" else ())
        return {k: v for k, v in d.items() if k not in unused}
    return run(saved) == run(dataclasses.asdict(cfg))


def _base_paths(cfg: TrainConfig) -> tuple[Path, ...]:
    """Where the base model's files are: its path, or a built-in's folders."""
    from edgerank.models.supply import input_paths

    return input_paths(cfg.base, cache=False)


def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def train(cfg: TrainConfig, force: bool = False, stop_after: int | None = None,
          progress: bool = True) -> Path | None:
    """Run (or resume) ``cfg``; returns the output folder, or None when ``stop_after``
    ended the run early (its checkpoint is kept, and the same call continues it)."""
    cfg.validate()
    out = check_output(cfg.out, cfg.data, *_base_paths(cfg), folder=True, parents=True)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    groups = read_groups(cfg.data)
    if cfg.loss == "kl" and any("teacher_scores" not in g for g in groups):
        raise ValueError(f"{cfg.data}: loss 'kl' needs teacher_scores: run python -m edgerank.data label")
    work = _work_dir(out)
    ckpt_path = work / "checkpoint.pt"
    state = _saved_state(ckpt_path, cfg, work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the fresh head (cross-encoders) is drawn from here
    backend, names, params = _trainable_model(cfg)
    spec = backend.spec.with_max_length(cfg.max_length)
    module = backend.model
    opt, sched = _optimizer(cfg, params)
    step, log = 0, []
    if state is not None:
        step, log = _resume(state, dict(zip(names, params)), opt, sched)
    module.train()
    started = time.perf_counter() - (log[-1]["elapsed_s"] if log else 0.0)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {Path(cfg.out).name}", unit="step",
               disable=not progress)
    ran = 0
    while step < cfg.steps:
        if stop_after is not None and ran >= stop_after:  # a deliberate stop keeps every step
            _checkpoint(ckpt_path, cfg, step, log, dict(zip(names, params)), opt, sched)
            bar.close()
            return None
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = _batch(groups, cfg, step * cfg.grad_accum + micro)
            loss = _loss(backend, spec, batch, cfg) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        ran += 1
        log.append({"step": step, "loss": total, "lr": sched.get_last_lr()[0],
                    "elapsed_s": time.perf_counter() - started})
        bar.set_postfix(loss=f"{total:.4f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _checkpoint(ckpt_path, cfg, step, log, dict(zip(names, params)), opt, sched)
    bar.close()
    module.eval()
    return _finish(cfg, backend, work, out, log)


def _saved_state(ckpt_path: Path, cfg: TrainConfig, work: Path) -> dict | None:
    """An interrupted run's checkpoint, if there is one of this same config."""
    if not ckpt_path.is_file():
        return None
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if not _same_run(state["config"], cfg):
        raise ValueError(f"{work} holds an interrupted run with another config; delete it to start over")
    return state


def _optimizer(cfg: TrainConfig, params: list) -> tuple:
    """AdamW, and a linear warm-up then linear decay to 0 at ``cfg.steps``."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm))))
    return opt, sched


def _resume(state: dict, trainable: dict, opt, sched) -> tuple[int, list[dict]]:
    """Restore the trainable weights, optimizer, schedule and RNG; returns (step, log)."""
    with torch.no_grad():
        for n, t in state["trainable"].items():
            trainable[n].copy_(t)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["log"]


def _trainable_model(cfg: TrainConfig):
    """The base model with its adapters attached: (backend, trainable names, their tensors)."""
    backend = _load(cfg)
    module = backend.model
    if cfg.adapter == "lora":
        from edgerank.converters.adapters import attach_lora

        n_layers = backend.full_model.config.num_hidden_layers
        layers = supervised_layers(n_layers, cfg.layer_min_depth) if cfg.layer_weight else ()
        if cfg.lora_upper and layers and layers[0] <= n_layers - cfg.lora_upper:
            # the readout before layer l depends on layers < l only: it can learn once l-1 is adapted
            first = n_layers - cfg.lora_upper + 1
            raise ValueError(f"layer_weight trains the readouts before layers {layers[0]}..{n_layers - 1}, but LoRA "
                             f"adapts only the last {cfg.lora_upper} of {n_layers} layers, so readouts before layer "
                             f"{first} cannot change: raise layer_min_depth to {first / n_layers:.2f} or lora_upper")
        attach_lora(module, backend.spec.kind, n_layers, cfg.lora_r, cfg.lora_alpha, cfg.lora_upper)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return backend, [n for n, _ in named], [p for _, p in named]


def _load(cfg: TrainConfig):
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.runtime.sources import check_max_length

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.qlora and not device.startswith("cuda"):
        raise ValueError("QLoRA training needs CUDA (bitsandbytes); on CPU train LoRA or full in fp32")
    if cfg.precision == "bf16" and not device.startswith("cuda") and not cpu_has_native_bf16():
        raise ValueError("bf16 needs CUDA or a CPU with native bf16 (AVX512-BF16 or AMX); this CPU "
                         "would emulate it, slower than fp32: train in fp32")
    source = resolve(cfg.base, family=cfg.family)
    check_max_length(source, cfg.max_length)
    backend = ReferenceBackend(source, device=device)
    if cfg.qlora:
        _quantize_frozen_base(backend)
    return backend


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), where
    ``--precision bf16`` trains faster than fp32 (RESULTS §11.1: a SmolLM2 step in 0.82x
    the fp32 time on 2 Zen 4 cores)."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def _quantize_frozen_base(backend) -> None:
    """QLoRA: swap the frozen linear layers for bitsandbytes 4-bit (NF4) ones."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("QLoRA needs bitsandbytes: pip install bitsandbytes (CUDA only)") from e
    from edgerank.converters.adapters import DECODER_TARGETS

    for name, sub in list(backend.model.named_modules()):
        for child_name, child in list(sub.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name in DECODER_TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = child.bias
                setattr(sub, child_name, q.to(backend.device))


def _batch(groups: list[dict], cfg: TrainConfig, index: int) -> list[dict]:
    """The ``index``-th micro-batch: a fixed function of (seed, index), so a resumed run
    sees exactly the batches the uninterrupted run would have."""
    per_epoch = max(1, len(groups) // cfg.queries_per_step)
    epoch, slot = divmod(index, per_epoch)
    order = list(range(len(groups)))
    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
    rng = random.Random(cfg.seed * 7_919 + index)
    out = []
    for g in (groups[i] for i in order[slot * cfg.queries_per_step:(slot + 1) * cfg.queries_per_step]):
        texts, labs = candidates(g), labels(g)
        teacher = g.get("teacher_scores")
        keep = list(range(len(texts)))
        has_pos = g.get("positive") is not None
        rest = keep[1:] if has_pos else keep
        if len(keep) > cfg.group_size:
            rest = rng.sample(rest, cfg.group_size - (1 if has_pos else 0))
        keep = ([0] if has_pos else []) + rest
        out.append({"query": g["query"], "texts": [texts[i] for i in keep], "labels": [labs[i] for i in keep],
                    "teacher": None if teacher is None else [teacher[i] for i in keep]})
    return out


def supervised_layers(n_layers: int, min_depth: float) -> tuple[int, ...]:
    """The layers whose incoming hidden state ``layer_weight`` trains the head on: every
    layer the pruning runtime checks before at ``min_depth``, up to the last."""
    from edgerank.runtime.pruning import PruningPolicy

    return tuple(range(PruningPolicy(min_depth=min_depth).first_layer(n_layers), n_layers))


def _loss(backend, spec, batch: list[dict], cfg: TrainConfig) -> torch.Tensor:
    from edgerank.train.losses import listwise_kl, pointwise_bce, ranknet

    encoded = [encode_pairs(spec, backend.tokenizer, g["query"], g["texts"]) for g in batch]
    sizes = [len(g["texts"]) for g in batch]
    device = backend.device
    layers = ()
    if cfg.layer_weight:
        layers = supervised_layers(backend.full_model.config.num_hidden_layers, cfg.layer_min_depth)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    with autocast:
        if spec.kind == "decoder":  # each query's template prefix once, shared by its candidates
            outputs = torch.cat([backend.head_outputs_by_layer(e.sequences, None, layers, prefix_len=e.prefix_len)
                                 for e in encoded], dim=1)
        else:
            outputs = backend.head_outputs_by_layer([s for e in encoded for s in e.sequences],
                                                    [t for e in encoded for t in e.type_ids or []] or None, layers)
    width = max(sizes)
    mask = torch.zeros((len(batch), width), dtype=torch.bool, device=device)
    lab = torch.zeros((len(batch), width), device=device)
    teach = torch.zeros((len(batch), width), device=device)
    for q, (g, n) in enumerate(zip(batch, sizes)):
        mask[q, :n] = True
        lab[q, :n] = torch.tensor(g["labels"], device=device)
        if g["teacher"] is not None:
            teach[q, :n] = torch.tensor(g["teacher"], device=device)
    target = teach if cfg.loss != "bce" and all(g["teacher"] is not None for g in batch) else lab

    def group_loss(logits: torch.Tensor) -> torch.Tensor:
        student = torch.zeros((len(batch), width), device=device)
        student[mask] = logits  # row-major: each query's candidates in order
        if cfg.loss == "kl":
            loss = listwise_kl(student, teach, mask, cfg.teacher_temperature)
        elif cfg.loss == "bce":
            loss = pointwise_bce(student, lab, mask)
        else:
            loss = ranknet(student, target, mask, cfg.margin if cfg.loss == "margin" else None)
        if cfg.label_weight and cfg.loss != "bce":
            loss = loss + cfg.label_weight * pointwise_bce(student, lab, mask)
        return loss

    logits = [spec.score.logit(o).float() for o in outputs]
    loss = group_loss(logits[0])
    if layers:
        loss = loss + cfg.layer_weight * torch.stack([group_loss(x) for x in logits[1:]]).mean()
    return loss


def _checkpoint(path: Path, cfg, step, log, trainable, opt, sched) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": dataclasses.asdict(cfg), "step": step, "log": log,
                "trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def _finish(cfg: TrainConfig, backend, work: Path, out: Path, log: list[dict]) -> Path:
    """Write the HF folder (LoRA merged exactly) into ``work/model``, then rename it to ``out``."""
    staging = work / "model"
    _write_model(cfg, backend, staging, log)
    _remove(out)  # only there with force=True
    os.replace(staging, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def export_checkpoint(cfg: TrainConfig, dest: str | Path, force: bool = False) -> Path:
    """Write the model as it stands at the last checkpoint of ``cfg``'s unfinished run, to
    evaluate it mid-run. The run itself is untouched and resumes as before."""
    dest = Path(dest)
    work = _work_dir(Path(cfg.out))
    ckpt = work / "checkpoint.pt"
    if not ckpt.is_file():
        if Path(cfg.out).exists():
            raise FileNotFoundError(f"the run of {cfg.out} has finished: that folder is its model "
                                    "(no checkpoint is left to export)")
        raise FileNotFoundError(f"no checkpoint of a run of {cfg.out} (looked for {ckpt})")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if not _same_run(state["config"], cfg):
        raise ValueError(f"{ckpt} is a run with another config than the one given")
    check_output(dest, cfg.data, *_base_paths(cfg), work, flag="--export-checkpoint", folder=True, parents=True)
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} exists; pass force=True (--force) to replace it")
    backend, names, params = _trainable_model(cfg)
    with torch.no_grad():
        for name, tensor in dict(zip(names, params)).items():
            tensor.copy_(state["trainable"][name])
    backend.model.eval()
    staging = dest.parent / f".{dest.name}.partial"
    _write_model(cfg, backend, staging, state["log"], {"checkpoint_step": state["step"]})
    _remove(dest)
    os.replace(staging, dest)
    return dest


def _remove(path: Path) -> None:
    """Remove what ``--force`` replaces: a folder, or a file where a folder will go."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_model(cfg: TrainConfig, backend, staging: Path, log: list[dict], extra: dict | None = None) -> None:
    """The HF folder of ``backend``'s model (a LoRA merged exactly, its adapter kept beside
    it), with the config, cost, loss log and plot of the run."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if cfg.adapter == "lora":
        from edgerank.converters.adapters import save_adapter

        adapter = staging / ADAPTER_FILE
        save_adapter(backend.model, backend.weight_prefix, adapter, cfg.lora_r, cfg.lora_alpha,
                     cfg.base, cfg.family)
        backend.close()
        digest = export_merged(resolve(cfg.base, family=cfg.family), adapter, staging)
    elif cfg.svd_rank:
        from edgerank.runtime.backends.reference import ReferenceBackend

        base = ReferenceBackend(resolve(cfg.base, family=cfg.family), device="cpu")  # loaded once: cut, then merged
        extra = {**(extra or {}), **_write_svd_adapter(cfg, base, backend, staging / ADAPTER_FILE)}
        backend.close()
        digest = export_merged(base.source, staging / ADAPTER_FILE, staging, base_backend=base)
    else:
        digest = save_model(backend, cfg.family, staging)
    cost = {"steps": len(log), "train_seconds": round(log[-1]["elapsed_s"], 1) if log else 0.0,
            "device": str(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")),
            "hardware": _hardware(), "final_loss": log[-1]["loss"] if log else None, "weights_sha256": digest,
            **(extra or {})}
    (staging / "train_config.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "cost": cost}, indent=2))
    with open(staging / "train_log.jsonl", "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    _plot_loss(log, staging / "loss.png", Path(cfg.out).name)


def _write_svd_adapter(cfg: TrainConfig, base, backend, path: Path) -> dict:
    """``backend``'s projection updates over ``base`` at rank ``cfg.svd_rank``, as an adapter file."""
    from edgerank.converters.adapters import DECODER_TARGETS, svd_update, write_adapter

    pairs, r, kept = svd_update(base.full_model.state_dict(), backend.full_model.state_dict(),
                                cfg.svd_rank, DECODER_TARGETS)
    write_adapter(pairs, path, r, r, {"base": cfg.base, "family": cfg.family, "made_by": "svd of a full fine-tune"},
                  dtype=cfg.svd_dtype)
    return {"svd_rank": r, "svd_update_energy_kept": round(kept, 4)}


def _hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _plot_loss(log: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not log:
        return
    steps = [r["step"] for r in log]
    losses = np.array([r["loss"] for r in log])
    win = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(win) / win, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.3, label="per step")
    ax.plot(steps[win - 1:], smooth, label=f"mean of {win}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
