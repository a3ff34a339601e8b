"""The config machinery every layer's dataclasses share: merging, errors that name the key, dumping.

Each layer owns its config dataclasses (verl/workers/config.py, verl/trainer/config.py,
verl/trainer/sft_config.py); a run's whole config composes them. Values merge as defaults < YAML
file < command line (`key.sub=value`) in `load_config`: unknown keys and wrong types fail in the
merge, the rules of the values in the schema's `validate()`, both before any model is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value or combination is invalid; the message names the key and the rule."""


def require(condition: bool, key: str, rule: str) -> None:
    """Raise ConfigError naming `key` and the `rule` it breaks unless `condition` holds."""
    if not condition:
        raise ConfigError(f"config key `{key}`: {rule}")


def require_choice(value: Any, allowed: Collection[Any], key: str) -> None:
    """Raise ConfigError unless `value` is one of `allowed` (a registry the code dispatches on)."""
    if value not in allowed:
        names = ", ".join(str(name) for name in allowed)
        raise ConfigError(f"config key `{key}`: {value!r} is not one of: {names}")


def _derived_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        if f.metadata.get("derived"):
            keys.append(prefix + f.name)
        default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_derived_keys(type(default), prefix + f.name + "."))
    return keys


def _merge(schema_cls: type, sources: list[tuple[str, Any]]) -> Any:
    base = OmegaConf.structured(schema_cls)
    for origin, source in sources:
        try:
            base = OmegaConf.merge(base, source)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"config key `{key}` from {origin}: {reason}") from None
    return base


def load_config(argv: list[str], schema_cls: type) -> Any:
    """Build a `schema_cls` from `config=FILE` and `key=value` arguments (defaults < file < command
    line), then run its `validate()` when it has one."""
    file_args = [a for a in argv if a.startswith("config=")]
    overrides = [a for a in argv if not a.startswith("config=")]
    for arg in overrides:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r}: expected key=value or config=FILE")
    derived = set(_derived_keys(schema_cls))
    sources: list[tuple[str, Any]] = []
    for arg in file_args:
        path = arg.split("=", 1)[1]
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        sources.append((path, OmegaConf.load(path)))
    cli = OmegaConf.from_dotlist(overrides)
    sources.append(("the command line", cli))
    for origin, source in sources:
        for key in derived:
            if OmegaConf.select(source, key, default=None) is not None:
                raise ConfigError(f"config key `{key}` from {origin}: derived from other keys; do not set it")
    merged = _merge(schema_cls, sources)
    config = OmegaConf.to_object(merged)
    if hasattr(config, "validate"):
        config.validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for logging and saving beside checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]
