"""The `raysearch` command line: a thin Typer layer; each command parses its options into a frozen
config and calls one library function."""

from __future__ import annotations

from raysearch.cli.common import app


def _register() -> None:
    # Importing a command module adds its commands to `app`.
    from raysearch.cli import activate, add, build, collection, demo, errors, eval, eval_gldv2, search, serve, train  # noqa: F401


_register()


def main() -> None:
    """The `raysearch` command. Without -v, the native log lines of Ray and FAISS are kept off the
    terminal (raysearch.runtime.quiet_native_output); with it, everything shows."""
    import sys

    if not {"-v", "--verbose"} & set(sys.argv[1:]):
        from raysearch.runtime import quiet_native_output

        quiet_native_output()
    app()


__all__ = ["app", "main"]
