"""The README's command reference matches the commands: every option `--help` lists is described in
the command's README section, and every option a README synopsis shows exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from raysearch.cli import app

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()

# Command -> the README headings whose sections describe it (the first is its own).
SECTIONS = {
    "build": ["### raysearch build"],
    "index": ["### raysearch index", "### raysearch build"],
    "add": ["### raysearch add", "### raysearch build"],
    "search": ["### raysearch search"],
    "errors": ["### raysearch errors"],
    "remove": ["### Managing the collection"],
    "compact": ["### Managing the collection"],
    "models": ["### raysearch models, raysearch demo"],
    "demo": ["### raysearch models, raysearch demo"],
    "serve": ["### Start"],
    "query": ["### Query with raysearch query"],
    "activate": ["## Active indexing"],
    "train": ["## Training descriptors"],
    "eval copy": ["### Copy detection: DISC21 / ISC2021", "## Evaluation"],
    "eval landmarks": ["### Landmark retrieval: Revisited Oxford and Paris", "## Evaluation"],
    "eval cmc": ["### Labelled retrieval: FID-300 and CMC", "## Evaluation"],
    "eval gldv2": ["### GLDv2 retrieval", "## Evaluation"],
    "eval ann": ["### ANN recall", "## Evaluation"],
    "eval activation": ["## Active indexing"],
}


def section(heading: str, intro_only: bool = False) -> str:
    """The README text under `heading` up to the next heading of the same or a higher level, or
    with `intro_only` up to its first subheading (code blocks, whose comment lines start with '#',
    are not headings)."""
    level = 6 if intro_only else len(heading.split()[0])
    start = README.index(heading + "\n") + len(heading)
    body = README[start:]
    masked = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), body, flags=re.S)
    stop = re.search(r"^#{1,%d} " % level, masked, re.M)
    return body[: stop.start()] if stop else body


COMMON = section("## Commands", intro_only=True)   # what every command shares (-v/--verbose, exit codes)


def commands():
    """(name, click command) for every leaf command of the CLI."""
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, prefix):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, prefix + [name])
        else:
            out.append((" ".join(prefix), cmd))

    walk(root, [])
    return out


COMMANDS = commands()


def long_options(cmd) -> set[str]:
    names = set()
    for param in cmd.params:
        for opt in list(getattr(param, "opts", [])) + list(getattr(param, "secondary_opts", [])):
            if opt.startswith("--") and opt != "--help":
                names.add(opt)
    return names


def documented_options(cmd) -> list[tuple[str, ...]]:
    """Each option as the names any of which documents it: an on/off pair (--merge/--no-merge)
    is one option."""
    out = []
    for param in cmd.params:
        names = [o for o in list(getattr(param, "opts", [])) + list(getattr(param, "secondary_opts", []))
                 if o.startswith("--") and o != "--help"]
        if names:
            out.append(tuple(names))
    return out


def test_every_command_has_a_readme_section():
    assert {name for name, _ in COMMANDS} == set(SECTIONS)


@pytest.mark.parametrize("name, cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_of_a_command_is_in_its_readme_section(name, cmd):
    text = "\n".join(section(h) for h in SECTIONS[name]) + COMMON
    missing = sorted("/".join(names) for names in documented_options(cmd)
                     if not any(re.search(re.escape(opt) + r"(?![\w-])", text) for opt in names))
    assert not missing, f"`raysearch {name}` options missing from README {SECTIONS[name][0]!r}: {missing}"


@pytest.mark.parametrize("name, cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_a_readme_synopsis_shows_exists(name, cmd):
    """Options shown in `raysearch NAME ...` lines of the README's code blocks exist."""
    known = long_options(cmd)
    shown = set()
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        current = False
        for line in block.replace("\\\n", " ").splitlines():
            if re.match(r"\S", line):   # a new command line; indented lines continue a synopsis
                current = bool(re.match(rf"raysearch {re.escape(name)}(\s|$)", line))
            if current:
                shown |= set(re.findall(r"(--[a-z][a-z0-9-]*)", line.split("#")[0]))
    unknown = sorted(opt for opt in shown if opt not in known and opt != "--help")
    assert not unknown, f"README shows `raysearch {name}` options that do not exist: {unknown}"


def test_top_k_has_a_long_form():
    for name, cmd in COMMANDS:
        if name in ("search", "query"):
            assert "--top-k" in long_options(cmd)
