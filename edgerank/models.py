"""``python -m edgerank.models {list,pull}``: the built-in models and obtaining them."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from edgerank import pull as pulling
from edgerank.errors import EdgerankError
from models.catalog import BUILTINS, DEFAULT_MODEL


def list_models(console: Console) -> None:
    table = Table(title=f"edgerank built-in models (cache: {pulling.edgerank_home()})")
    for col in ("name", "family", "size", "licence", "present", "made by"):
        table.add_column(col)
    for m in BUILTINS.values():
        name = m.name + (" (default)" if m.name == DEFAULT_MODEL else "")
        table.add_row(name, m.family, f"{m.size_bytes / 1e6:.0f} MB", m.licence,
                      "yes" if pulling.is_present(m.name) else "no", m.made_by)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgerank.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the built-in models and whether each is present")
    p = sub.add_parser("pull", help="download and verify built-in models into the cache")
    p.add_argument("names", nargs="+", metavar="NAME", choices=sorted(BUILTINS) + ["all"])
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "list":
        list_models(console)
        return 0
    names = list(BUILTINS) if "all" in args.names else args.names
    for name in names:
        try:
            path = pulling.pull(name)
        except EdgerankError as e:
            console.print(f"[red]error[/] {name}: {e}")
            return 2
        console.print(f"[green]ok[/] {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
