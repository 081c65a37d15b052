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
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (save_pretrained); default models/demo when present, else viewer only")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, help="user:password, or a file with one user:password per line")
    p.add_argument("--examples", type=Path, default=None, help="folder of example studies (default: the bundled sample)")
    p.add_argument("--max-file-size", default="500mb", help="largest upload accepted (default 500mb)")
    p.add_argument("--concurrency", type=int, default=2, help="reports generated at once (default 2)")
    p.add_argument("--session-ttl", type=int, default=3600,
                   help="seconds after which a session's files are deleted at the latest (default 3600)")
    p.add_argument("--strategy", choices=("greedy", "beam", "mbr"), default=None,
                   help="decoding for every report this server writes (default: the model folder's decoding.json; "
                        "the demo model's is MBR over 8 samples, about 4 s a report on 2 cores: greedy is about "
                        "3x faster, its text agrees less with the findings table)")


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


def resolve_model_dir(model: Path | None) -> Path | None:
    """An explicit ``--model`` must exist; without one, ``models/demo`` when present, else None."""
    from app.ui import DEFAULT_MODEL_DIR

    if model is not None:
        if not Path(model).is_dir():
            raise MedreportError(f"--model {model}: no such model directory (train one with `make demo-model`)")
        return Path(model)
    return DEFAULT_MODEL_DIR if DEFAULT_MODEL_DIR.is_dir() else None


def serve_config(model_dir: Path, strategy: str | None = None):
    """The PipelineConfig the server decodes with: the model folder's ``decoding.json`` (as
    ``generate`` and ``ReportPipeline.from_dir`` read it), with ``strategy`` instead when given."""
    from app.decoding import read_decoding, validate_decoding
    from app.pipeline import PipelineConfig

    chosen = read_decoding(model_dir)
    if strategy is not None:
        chosen = validate_decoding({**chosen, "strategy": strategy}, "--strategy")
    return PipelineConfig(**chosen)


def run(args: argparse.Namespace) -> int:
    from app.ui import DEFAULT_EXAMPLES, NO_MODEL_MESSAGE, UIConfig, build_app, launch_kwargs, warm_up

    model_dir = resolve_model_dir(args.model)
    cfg = UIConfig(model_dir=model_dir, examples_dir=args.examples or DEFAULT_EXAMPLES,
                   concurrency_limit=args.concurrency, session_ttl_s=args.session_ttl)
    pipe = None
    if model_dir is not None:  # load the model now, not on the first click
        import threading

        from app.pipeline import ReportPipeline

        pipe = ReportPipeline.from_dir(model_dir, serve_config(model_dir, getattr(args, "strategy", None)))
        threading.Thread(target=warm_up, args=(pipe, cfg.examples_dir), daemon=True, name="ui-warm-up").start()
    app = build_app(cfg.examples_dir, config=cfg, pipeline=pipe)
    print(f"medreport UI on http://{args.host}:{args.port}  (demo: synthetic data, not for clinical use)")
    if model_dir is None:
        print(NO_MODEL_MESSAGE)
    app.launch(server_name=args.host, server_port=args.port, auth=parse_auth(args.auth),
               max_file_size=args.max_file_size, **launch_kwargs())
    return 0
