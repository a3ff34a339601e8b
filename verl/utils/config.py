"""The config machinery every layer's dataclasses share: merging, errors that name the key, dumping.

Each layer owns its config dataclasses (verl/workers/config.py, verl/trainer/config.py,
verl/trainer/sft_config.py); a run's whole config composes them. Values merge as defaults < YAML
file < command line (`key.sub=value`) in `load_config`: unknown keys and wrong types fail in the
merge, the rules of the values in the schema's `validate()`, both before any model is loaded.

A key whose values are words including "true" and "false" (`choice_field`, e.g. `self_reward.enable`:
auto, true, false) also takes a YAML boolean: `enable: true` in a file and `enable=true` on the command
line are read by YAML as the boolean, which `load_config` turns back into the word before the merge.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value or combination is invalid; the message names the key and the rule."""


@dataclass(frozen=True)
class ForeignKey:
    """How a key of another framework's config (EasyR1, the original Vision-SR1) is read here.

    A schema lists these in a `foreign_keys()` classmethod ({dotted key: ForeignKey}). At load, a
    key found in a file or on the command line is taken out before the merge and either
    - rewritten into our keys (`to(value)` returns {our dotted key: value}; nothing for a no-op
      whose meaning is already our behaviour), when `accepts(value, source)` holds, or
    - reported, with every other such key of the same load, in one error saying what to use instead.
    """

    meaning: str
    """What the key does here (or why it is not available yet): the text of the error and the README table."""
    to: Callable[[Any], dict[str, Any]] | None = None
    """Our keys and values it sets; None: not available (every value is reported)."""
    accepts: Callable[[Any, Any], bool] = lambda value, config: True
    """Values that mean the same here; also given the whole config as written (every file and the
    command line merged), for keys whose meaning depends on their siblings."""
    ignored: bool = False
    """Accepted and without effect here (logged as a warning naming the key)."""
    wins: bool = False
    """What it sets replaces our key's value given beside it (else giving both, differently, is an error)."""


def alias(target: str, meaning: str = "") -> ForeignKey:
    """The same key under our name."""
    return ForeignKey(meaning or f"same as `{target}`", to=lambda value: {target: value})


def no_op(meaning: str, accepts: Callable[[Any, Any], bool] = lambda value, source: True) -> ForeignKey:
    """Accepted values mean what this code always does; other values are reported as not available."""
    return ForeignKey(meaning, to=lambda value: {}, accepts=accepts, ignored=True)


def not_available(instead: str) -> ForeignKey:
    """A feature this code does not have (yet): always reported, with what to use instead."""
    return ForeignKey(instead)


def _select(source: Any, key: str) -> tuple[bool, Any]:
    node = source
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _delete(source: Any, key: str) -> None:
    parent_key, _, last = key.rpartition(".")
    parent = OmegaConf.select(source, parent_key) if parent_key else source
    del parent[last]


def _read_foreign_keys(
    source: Any, origin: str, table: dict[str, ForeignKey], problems: list[str], context: Any
) -> Any:
    """`source` with every key of `table` taken out and rewritten into ours; keys not available here
    are appended to `problems` (all of a load are reported together). `context` (every source merged,
    later ones winning) is what `accepts` sees of the sibling keys."""
    updates: dict[str, Any] = {}
    for key, rule in table.items():
        found, value = _select(source, key)
        if not found:
            continue
        _delete(source, key)
        if rule.to is None or not rule.accepts(value, context):
            problems.append(f"  `{key}` ({value!r}, from {origin}): {rule.meaning}")
            continue
        if rule.ignored:
            logger.warning("config key `%s` (%r) is accepted and has no effect here: %s", key, value, rule.meaning)
        for target, new in rule.to(value).items():
            if target in updates and updates[target] != new:
                raise ConfigError(f"config keys from {origin}: `{key}` and another key both set `{target}`")
            found_target, given = _select(source, target)
            if found_target and given != new and not rule.wins:
                raise ConfigError(
                    f"config key `{key}` from {origin} sets `{target}` to {new!r}, but `{target}` is also "
                    f"given as {given!r}: keep one of them"
                )
            updates[target] = new
    for target, new in updates.items():
        OmegaConf.update(source, target, new, force_add=True)
    return source


def require(condition: bool, key: str, rule: str) -> None:
    """Raise ConfigError naming `key` and the `rule` it breaks unless `condition` holds."""
    if not condition:
        raise ConfigError(f"config key `{key}`: {rule}")


def require_choice(value: Any, allowed: Collection[Any], key: str) -> None:
    """Raise ConfigError unless `value` is one of `allowed` (a registry the code dispatches on)."""
    if value not in allowed:
        names = ", ".join(str(name) for name in allowed)
        raise ConfigError(f"config key `{key}`: {value!r} is not one of: {names}")


def require_size(
    value: int | None,
    key: str,
    minimum: int = 1,
    *,
    sentinel: tuple[int, str] | None = None,
    null: str | None = None,
) -> None:
    """Raise ConfigError naming `key` unless the count or length `value` is at least `minimum`, or the
    documented `sentinel` (value, meaning), e.g. (-1, "the whole set"), or None where `null` (its
    meaning) allows it. Sizes are checked at load: a zero or negative one otherwise fails only deep
    in a run (a division by zero, a split into no parts), after the models have loaded."""
    if value is None and null is not None:
        return
    if sentinel is not None and value == sentinel[0]:
        return
    rule = "must be positive" if minimum == 1 else f"must be >= {minimum}"
    if sentinel is not None:
        rule += f", or {sentinel[0]} ({sentinel[1]})"
    if null is not None:
        rule += f", or null ({null})"
    require(value is not None and value >= minimum, key, f"{rule}; got {value!r}")


def choice_field(default: str, choices: Collection[str]) -> Any:
    """A str key taking one of the words `choices` (check it with `require_choice`). Where they
    include "true" and "false", a YAML boolean given for the key means that word."""
    return field(default=default, metadata={"choices": tuple(choices)})


def _schema_fields(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, dataclass field) of every key of `cls`, nested sections included (an optional
    section, `X | None`, too: its keys may be given in a file)."""
    hints = get_type_hints(cls)
    found = []
    for f in fields(cls):
        found.append((prefix + f.name, f))
        for section in getattr(hints[f.name], "__args__", (hints[f.name],)):
            if is_dataclass(section) and isinstance(section, type):
                found.extend(_schema_fields(section, prefix + f.name + "."))
    return found


def _derived_keys(cls: type) -> list[str]:
    return [key for key, f in _schema_fields(cls) if f.metadata.get("derived")]


def _boolean_word_keys(cls: type) -> list[str]:
    """Keys declared with `choice_field` whose choices include the words "true" and "false"."""
    return [key for key, f in _schema_fields(cls) if {"true", "false"} <= set(f.metadata.get("choices", ()))]


def _booleans_to_words(source: Any, keys: list[str]) -> None:
    """YAML reads `true`/`false` (and yes/no, on/off) as booleans, and the merge into a str key would
    make them "True"/"False", which no choice list holds: the words they stand for instead."""
    for key in keys:
        found, value = _select(source, key)
        if found and isinstance(value, bool):
            OmegaConf.update(source, key, "true" if value else "false")


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
    table = schema_cls.foreign_keys() if hasattr(schema_cls, "foreign_keys") else {}
    if table:
        problems: list[str] = []
        context = OmegaConf.merge(*(source for _, source in sources))
        # A foreign key set by several sources is read from the last one only (it wins, as ours do).
        for i, (_, source) in enumerate(sources):
            for key in table:
                if _select(source, key)[0] and any(_select(later, key)[0] for _, later in sources[i + 1 :]):
                    _delete(source, key)
        sources = [(origin, _read_foreign_keys(source, origin, table, problems, context)) for origin, source in sources]
        if problems:
            raise ConfigError(
                f"{len(problems)} config key(s) of another framework name features not available here:\n"
                + "\n".join(problems)
            )
    boolean_words = _boolean_word_keys(schema_cls)
    for origin, source in sources:
        _booleans_to_words(source, boolean_words)
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
