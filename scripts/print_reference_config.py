"""Print the reference YAML of every config key, with each field's docstring as a comment.

python scripts/print_reference_config.py > examples/config.yaml
"""

from __future__ import annotations

import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from verl.trainer.config import PPOConfig  # noqa: E402
from verl.utils.cli_help import field_docs  # noqa: E402


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
