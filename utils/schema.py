"""Strict dataclass configs: every config in this project is a dataclass, and a dict that feeds one
must use only its declared keys. A misspelt key is the most common silent failure of the original
HRM code (pydantic `extra='allow'` swallowed it), so here it is an error naming the closest key."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Iterable, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that does not fit its schema. The message is one line, user-facing."""


def closest_key(key: str, valid: Iterable[str]) -> str | None:
    """The valid key most similar to `key` (difflib ratio >= 0.5), or None."""
    valid = list(valid)
    hits = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if hits:
        return hits[0]
    lowered = {v.lower(): v for v in valid}
    return lowered.get(key.lower())


def unknown_key_message(key: str, valid: Iterable[str], where: str) -> str:
    valid = sorted(valid)
    hint = closest_key(key, valid)
    suggestion = f"did you mean '{hint}'?" if hint else f"valid keys: {', '.join(valid)}"
    return f"unknown config key '{where}.{key}' " + suggestion if where else f"unknown config key '{key}'; " + suggestion


def check_keys(given: Iterable[str], valid: Iterable[str], where: str = "") -> None:
    """Raise ConfigError for the first key of `given` that is not in `valid`."""
    valid = set(valid)
    for key in given:
        if key not in valid:
            raise ConfigError(unknown_key_message(key, valid, where))


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Light type check for the scalar annotations configs use (int, float, bool, str, Optional)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(value, non_none[0], where)
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' expects a bool, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{where}' expects an int, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}' expects a float, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' expects a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and mistyped scalars.

    Missing keys take the dataclass defaults; a missing key without default is an error too."""
    check_keys(data.keys(), field_names(cls), where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints.get(f.name, Any), path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"config key '{path}' is required")
    return cls(**kwargs)


def apply_key_values(target: Any, words: Iterable[str], options: Iterable[str], ints: Iterable[str] = (),
                     floats: Iterable[str] = ()) -> None:
    """The `key=value` words of a script's command line (evaluate.py, solve.py) set onto `target`: unknown
    keys name the closest valid one; `ints`/`floats` are converted (`null` gives None), one error line each."""
    options, ints, floats = list(options), set(ints), set(floats)
    for word in words:
        if "=" not in word:
            raise ConfigError(f"argument '{word}' is not key=value (keys: {', '.join(options)})")
        key, value = word.split("=", 1)
        if key not in options:
            raise ConfigError(unknown_key_message(key, options, ""))
        if (key in ints or key in floats) and value != "null":
            try:
                value = int(value) if key in ints else float(value)
            except ValueError:
                raise ConfigError(f"'{key}' expects {'an integer' if key in ints else 'a number'}, got {value!r}") from None
        elif value == "null":
            value = None
        setattr(target, key, value)
