"""Print the reference YAML of every config key, with each field's docstring as a comment.

python scripts/print_reference_config.py > examples/config.yaml                       # training
python scripts/print_reference_config.py generate > examples/generate_config.yaml    # benchmark generation
"""

from __future__ import annotations

import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from verl.trainer.config import PPOConfig  # noqa: E402
from verl.trainer.generate import GenerateConfig  # noqa: E402
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


# command-line name: (schema, where it is defined, the command it configures, the file it is written to)
SCHEMAS = {
    "train": (PPOConfig, "verl/trainer/config.py", "verl.trainer.main", "examples/config.yaml"),
    "generate": (GenerateConfig, "verl/trainer/generate.py", "verl.trainer.generate", "examples/generate_config.yaml"),
}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "train"
    if name not in SCHEMAS:
        print(f"usage: python {sys.argv[0]} [{' | '.join(SCHEMAS)}]  (default: train)", file=sys.stderr)
        raise SystemExit(2)
    schema, source, command, reference = SCHEMAS[name]
    out = [
        f"# Reference configuration: every key with its default (see {source}).",
        f"# Use: python -m {command} config={reference} key=value ...",
    ]
    emit(schema, 0, out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
