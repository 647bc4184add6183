"""``python -m edgerank.serve``: load one model and serve it over HTTP (Cohere, Jina,
llama.cpp, Infinity and TEI rerank shapes) on 127.0.0.1 until SIGTERM or Ctrl-C, which drain first."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from edgerank.cli import exits_on, option_pair, port, positive_int, positive_number


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgerank.serve", description=__doc__)
    p.add_argument("--model", default=None, help="built-in name, path or hf:ORG/NAME (default: minilm-l6)")
    p.add_argument("--backend", default=None, help="edgerank, reference or llamacpp (default: the model's)")
    p.add_argument("--family", default=None, help="the reranker family, where the files do not tell")
    p.add_argument("--max-length", type=positive_int, default=None, help="tokens per pair (default: the model's)")
    p.add_argument("--max-memory-mb", type=positive_number, default=None,
                   help="memory the model may add to the process (edgerank backend)")
    p.add_argument("--threads", type=positive_int, default=None, help="runtime threads (edgerank backend)")
    p.add_argument("--option", type=option_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="another Reranker option, e.g. pruning=false or threshold=0.1; repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=port, default=8080)
    p.add_argument("--api-key", default=os.environ.get("EDGERANK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $EDGERANK_API_KEY); needed off loopback")
    p.add_argument("--max-queue", type=non_negative_int, default=16,
                   help="requests that may wait behind the running one; more get 429 (default 16)")
    p.add_argument("--timeout", type=positive_number, default=60.0,
                   help="seconds a request may take once its body is in, queueing included; then 503 (default 60)")
    p.add_argument("--read-timeout", type=positive_number, default=30.0,
                   help="seconds a client has to send a request, head and body; then 408 (default 30)")
    p.add_argument("--max-body-bytes", type=positive_int, default=8 * 1024 * 1024,
                   help="largest request body; more is 413 (default 8 MiB)")
    p.add_argument("--max-documents", type=positive_int, default=1000,
                   help="most documents in one request; more is 413 (default 1000)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let pages from ORIGIN (e.g. http://localhost:3000, or *) call the server from a "
                        "browser; repeatable (default: none)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def settings_from(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The Reranker options and the server's Settings the command line asks for."""
    from edgerank.serve import Settings

    options = dict(args.option)
    for key in ("family", "max_length", "max_memory_mb", "threads"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    settings = Settings(model=args.model, backend=args.backend, options=options, max_queue=args.max_queue,
                        timeout_s=args.timeout, read_timeout_s=args.read_timeout,
                        max_body_bytes=args.max_body_bytes, max_documents=args.max_documents,
                        api_key=args.api_key, cors_origins=list(args.cors_origin))
    return options, settings


@exits_on(FileNotFoundError, ValueError, TypeError)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not is_loopback(args.host) and not args.api_key:
        print(f"error: binding {args.host} lets other machines use the model: give --api-key "
              "(or EDGERANK_API_KEY)", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from edgerank.serve import create_app, server_config
    except ImportError as e:
        print(f"error: the server needs its extra: pip install 'edgerank[server]' ({e})", file=sys.stderr)
        return 2
    options, settings = settings_from(args)
    from edgerank import Reranker

    # loaded here, not in the app's start-up, so a bad --model is one error line and exit 2
    reranker = Reranker(model=args.model, backend=args.backend, **options)
    try:
        # uvicorn handles SIGTERM and SIGINT: it stops accepting, lets in-flight requests
        # finish, then runs the app's shutdown
        config = server_config(create_app(settings, reranker), host=args.host, port=args.port,
                               log_level=args.log_level, access_log=args.log_level == "debug")
        server = uvicorn.Server(config)
        server.run()
    finally:
        reranker.close()
    return 0 if server.started else 3  # 3: uvicorn's own status when it could not start (a port in use)


if __name__ == "__main__":
    sys.exit(main())
