"""Print the reference YAML of every config key, with each field's docstring as a comment.

python scripts/print_reference_config.py > examples/config.yaml
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from verl.trainer.config import PPOConfig  # noqa: E402


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass and the
    dataclasses it derives from; a subclass's own docstring wins."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and is_doc and isinstance(following.value.value, str):
                docs[node.target.id] = " ".join(following.value.value.split())  # type: ignore[union-attr]
    return docs


def emit(cls: type, indent: int, out: list[str]) -> None:
    docs = field_docs(cls)
    instance = cls()
    for f in fields(cls):
        if f.metadata.get("derived"):
            continue
        pad = "  " * indent
        if f.name in docs:
            out.append(f"{pad}# {docs[f.name]}")
        value = getattr(instance, f.name)
        if is_dataclass(value):
            out.append(f"{pad}{f.name}:")
            emit(type(value), indent + 1, out)
        else:
            if isinstance(value, tuple):
                value = list(value)
            text = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
            out.append(f"{pad}{text[1:-1] if text.startswith('{') else text}")


def main() -> None:
    out = [
        "# Reference configuration: every key with its default (see verl/trainer/config.py).",
        "# Use: python -m verl.trainer.main config=examples/config.yaml key=value ...",
    ]
    emit(PPOConfig, 0, out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
