"""`medreport serve`: the web UI on localhost (no public share link)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from data.errors import MedreportError

NAME = "serve"
HELP = "serve the web UI (default http://127.0.0.1:7860) with the bundled example studies"
log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, help="user:password, or a file with one user:password per line")
    p.add_argument("--examples", type=Path, default=None, help="folder of example studies (default: the bundled sample)")
    p.add_argument("--max-file-size", default="2gb", help="largest upload accepted (default 2gb)")


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """`user:password` or a file of such lines -> Gradio auth pairs."""
    if not spec:
        return None
    path = Path(spec)
    lines = path.read_text().splitlines() if path.is_file() else [spec]
    pairs = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, pw = line.partition(":")
        if not sep or not user or not pw:
            raise MedreportError("--auth takes user:password (or a file with one user:password per line)")
        pairs.append((user, pw))
    return pairs


def run(args: argparse.Namespace) -> int:
    from app.ui import DEFAULT_EXAMPLES, build_app

    app = build_app(examples_dir=args.examples or DEFAULT_EXAMPLES)
    print(f"medreport UI on http://{args.host}:{args.port}  (demo: synthetic data, not for clinical use)")
    app.launch(server_name=args.host, server_port=args.port, auth=parse_auth(args.auth), share=False,
               max_file_size=args.max_file_size, footer_links=[])
    return 0
