"""``python -m edgerank.models {list,pull,cache}``: the built-in models, obtaining them, and
the conversion cache (``cache`` lists it; ``cache --clean`` removes conversions no model
uses any more: made from a model since retrained or deleted, or left by an interrupted
conversion)."""

from __future__ import annotations

import argparse
import sys

from edgerank.cli import exits_on, format_table
from edgerank.models import cache as caching
from edgerank.models import pull as pulling
from edgerank.models.catalog import BUILTINS, DEFAULT_MODEL


def list_models() -> None:
    print(f"edgerank built-in models (cache: {pulling.edgerank_home()})")
    rows = [[m.name + (" (default)" if m.name == DEFAULT_MODEL else ""), m.family, f"{m.size_bytes / 1e6:.0f} MB",
             m.licence, "yes" if pulling.is_present(m.name) else "no", m.made_by] for m in BUILTINS.values()]
    print(format_table(["name", "family", "size", "licence", "present", "made by"], rows))


def show_cache(clean: bool) -> None:
    found = caching.entries()
    if clean and any(e.removable for e in found):
        caching.check_cleanable()  # before the listing: one error line, nothing removed
    print(f"conversion cache: {caching.cache_dir()}")
    rows = [[e.name, e.state, f"{e.size_bytes / 1e6:.1f} MB", e.source or "-"] for e in found]
    print(format_table(["entry", "state", "size", "source"], rows))
    spare = [e for e in found if e.removable]
    freed = sum(e.size_bytes for e in spare) / 1e6
    if not clean:
        if spare:
            print(f"{len(spare)} entries ({freed:.0f} MB) are not used by any current model; "
                          "remove them with: python -m edgerank.models cache --clean")
        if any(e.state == "unmanaged" for e in found):
            print("unmanaged entries were not named by the cache (converted there by hand, or by an "
                          "older edgerank); --clean leaves them to you")
        return
    removed = caching.clean()
    print(f"removed {len(removed)} entries, {sum(e.size_bytes for e in removed) / 1e6:.0f} MB")


@exits_on()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgerank.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the built-in models and whether each is present")
    p = sub.add_parser("pull", help="download and verify built-in models into the cache")
    p.add_argument("names", nargs="+", metavar="NAME", choices=sorted(BUILTINS) + ["all"],
                   help=f"built-in models ({', '.join(sorted(BUILTINS))}), or all")
    c = sub.add_parser("cache", help="list the conversion cache; --clean removes unused conversions")
    c.add_argument("--clean", action="store_true", help="remove conversions no current model uses")
    args = parser.parse_args(argv)
    if args.command == "list":
        list_models()
        return 0
    if args.command == "cache":
        show_cache(args.clean)
        return 0
    names = list(BUILTINS) if "all" in args.names else args.names
    for name in names:
        path = pulling.pull(name)
        print(f"ok {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
