"""The `raysearch` command line: a thin Typer layer; each command parses its options into a frozen
config and calls one library function."""

from __future__ import annotations

from raysearch.cli.common import app


def _register() -> None:
    # Importing a command module adds its commands to `app`.
    from raysearch.cli import activate, add, build, demo, eval, eval_gldv2, search, serve  # noqa: F401


_register()


def main() -> None:
    app()


__all__ = ["app", "main"]
