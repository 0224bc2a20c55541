"""``grounded-sam-backend`` command line: ``serve`` and the offline tools.

Each feature module registers its own subcommands (``register(subparsers)``), so this file
only wires them and starts the server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from backend.config import ConfigError, Settings
from backend.logs import configure_logging


def _serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "workers": args.workers}.items() if v}
    settings = Settings.from_env(**overrides)
    configure_logging(settings.log_level, settings.log_format)

    from backend.app import create_app
    from backend.jobs import load_predictor_factory

    factory = load_predictor_factory()  # GSB_PREDICTOR_FACTORY, checked before gunicorn starts

    class _Server(BaseApplication):
        """Gunicorn with our app object: models load in each worker after fork (not preloaded),
        and the gthread worker keeps /health answering while /predict runs."""

        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", settings.threads)
            self.cfg.set("timeout", 600)
            self.cfg.set("graceful_timeout", 30)
            self.cfg.set("accesslog", "-")

        def load(self):  # noqa: ANN202 - gunicorn's signature
            return create_app(settings, factory)

    _Server().run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from backend.commands import batch_commands, coco_commands

    parser = argparse.ArgumentParser(prog="grounded-sam-backend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the Label Studio ML backend HTTP server")
    serve.add_argument("--host", help="bind address (env HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (env PORT, default 9090)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (env WORKERS, default 1)")
    serve.set_defaults(func=_serve)
    coco_commands.register(sub)
    batch_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
