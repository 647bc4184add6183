"""``python -m edgerank.train``: fine-tune a reranker on the reference (torch) path (``trainer``),
from a recipe (``recipes``) or from options."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from edgerank.cli import exits_on, positive_int
from edgerank.train import trainer
from edgerank.train.recipes import recipe_config
from edgerank.train.trainer import TrainConfig, export_checkpoint, train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgerank.train", description=trainer.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults apply without --recipe; a recipe sets its own, and "
                                       "options given override the recipe's.")
    p.add_argument("--recipe", help="a recipe from edgerank/train/recipes.py (data, teacher and config)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--stop-after", type=positive_int, help="run this many steps, checkpoint, and stop (resume later)")
    p.add_argument("--export-checkpoint", metavar="DIR", type=Path,
                   help="train nothing: write the model at the run's last checkpoint to DIR (to evaluate "
                        "it mid-run; the run resumes as before). Give the run's own options.")
    for f in dataclasses.fields(TrainConfig):
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.default is not dataclasses.MISSING and f.default is not None and f.type != "bool":
            text += f" (default {f.default})"
        if f.type == "bool":
            p.add_argument(flag, action="store_true", default=None, help=text)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None, choices=f.metadata["choices"], help=text)
    return p


@exits_on(ValueError, FileExistsError, FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name) is not None}
    if args.recipe:
        cfg = recipe_config(args.recipe, overrides=given)
    else:
        missing = [n for n in ("base", "family", "data", "out") if n not in given]
        if missing:
            raise ValueError(f"give --recipe, or all of {', '.join('--' + m for m in missing)}")
        cfg = TrainConfig(**given)
    if args.export_checkpoint:
        print(f"checkpoint -> {export_checkpoint(cfg, args.export_checkpoint, force=args.force)}")
        return 0
    out = train(cfg, force=args.force, stop_after=args.stop_after)
    print("stopped early; re-run the same command to resume" if out is None else f"trained model -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
