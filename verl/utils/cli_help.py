"""`--help` for the config-driven commands (train, SFT, generate): the usage, what the command does,
and the config reference (each top-level section with its keys), built from the config classes so it
cannot drift from them. No arguments at all prints the usage instead of starting a run with every
default: a multi-hour job should never start because an argument was forgotten."""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
from dataclasses import fields, is_dataclass
from typing import get_type_hints

HELP_FLAGS = ("-h", "--help")
EXIT_HELP = 0
EXIT_NO_ARGUMENTS = 2  # as argparse does for a missing required argument


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass and the
    dataclasses it derives from; a subclass's own docstring wins."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and is_doc and isinstance(following.value.value, str):
                docs[node.target.id] = " ".join(following.value.value.split())  # type: ignore[union-attr]
    return docs


def _section_class(cls: type, name: str) -> type | None:
    hint = get_type_hints(cls)[name]
    return next((t for t in getattr(hint, "__args__", (hint,)) if is_dataclass(t)), None)  # type: ignore[return-value]


def _keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if not f.metadata.get("derived")]


def config_reference(schema_cls: type, reference_yaml: str) -> str:
    """The top-level sections of `schema_cls` and their keys (a flat schema: each key and its doc)."""
    lines = [f"Config reference (every key with its default and meaning: {reference_yaml}):"]
    docs = field_docs(schema_cls)
    for name in _keys(schema_cls):
        section = _section_class(schema_cls, name)
        if section is None:
            doc = docs.get(name, "")
            lines.append(f"  {name}" + (f": {doc}" if doc else ""))
            continue
        keys = []
        for key in _keys(section):
            sub = _section_class(section, key)
            keys.append(f"{key}.{{{', '.join(_keys(sub))}}}" if sub is not None else key)
        text = f"  {name}: " + ", ".join(keys)
        lines.append(textwrap.fill(text, width=100, subsequent_indent="      "))
    return "\n".join(lines)


def handle_help(argv: list[str], usage: str, description: str, schema_cls: type, reference_yaml: str) -> None:
    """Exit with the usage and the config reference when `argv` asks for help (status 0), or with the
    usage alone on stderr when there are no arguments (status 2); otherwise return."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(f"{usage}\n\n{description.strip()}\n\n{config_reference(schema_cls, reference_yaml)}")
        raise SystemExit(EXIT_HELP)
    if not argv:
        print(
            f"{usage}\n(no arguments given: nothing started; `config={reference_yaml}` runs the reference "
            "configuration, --help lists every key)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_NO_ARGUMENTS)


def exit_if_no_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """The same rule for the argparse scripts whose defaults alone would start work (a build, a long
    run, files written at a default place): with no arguments at all (`argv`, else the command
    line's), print the usage on stderr and exit with EXIT_NO_ARGUMENTS; otherwise return."""
    given = sys.argv[1:] if argv is None else argv
    if given:
        return
    parser.print_usage(sys.stderr)
    print("(no arguments given: nothing started; --help describes every option)", file=sys.stderr)
    raise SystemExit(EXIT_NO_ARGUMENTS)
