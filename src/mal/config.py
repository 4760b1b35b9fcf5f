"""Typed configs: nested dataclasses filled from YAML files (differences from the defaults) and ``key=value`` overrides.

``load_config(TrainConfig, "run.yaml", ["optim.lr=1e-4"])`` reads the file (following ``_base_`` inheritance), applies
the overrides, and checks every value against the dataclass annotations. ``save_config`` writes the resolved config.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from mal.io import atomic_write

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_fields",
    "find_config",
    "flatten",
    "shipped_configs",
    "config_changes",
    "config_hash",
    "from_dict",
    "load_config",
    "load_yaml",
    "save_config",
    "to_dict",
]

T = TypeVar("T")

# PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string; accept it as a float, as YAML 1.2 does.
_SCI_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):  # the dumper needs it too, so that the string "1e-4" is written quoted
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _SCI_FLOAT, list("-+0123456789."))


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names the key path (and the file, if any)."""


class _Mismatch(ConfigError):
    """A value of the wrong type at ``path`` (as opposed to a problem found deeper inside it)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path or '<root>'}: {message}")
        self.path = path


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _type_name(tp: Any) -> str:
    if tp is NoneType:
        return "None"
    if tp is Any:
        return "Any"
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _mismatch(tp: Any, value: Any, path: str) -> _Mismatch:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return _Mismatch(path, f"expected {_type_name(tp)}, got {type(value).__name__} ({shown})")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted (lists to tuples, ints to floats, ...)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, UnionType):
        if value is None and NoneType in args:
            return None
        deeper: list[ConfigError] = []
        for arg in args:
            try:
                return _convert(arg, value, path)
            except _Mismatch as e:
                if e.path != path:
                    deeper.append(e)
            except ConfigError as e:
                deeper.append(e)
        raise deeper[0] if deeper else _mismatch(tp, value, path)
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in args):
            return value
        raise _Mismatch(path, f"expected one of {', '.join(map(repr, args))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, where=path)
        raise _mismatch(tp, value, path)
    if tp is NoneType:
        if value is None:
            return None
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf / .nan would only fail later, mid-run
                raise ConfigError(f"{path or '<root>'}: must be a finite number, got {value}")
            return float(value)
    elif tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
    elif tp is tuple or origin is tuple:
        if isinstance(value, list | tuple):
            if not args:
                return tuple(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise _Mismatch(path, f"expected {_type_name(tp)} ({len(args)} items), got {len(value)} items")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    elif tp is list or origin is list:
        if isinstance(value, list | tuple):
            item = args[0] if args else Any
            return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    elif tp is dict or origin is dict:
        if isinstance(value, Mapping):
            key_tp, val_tp = args or (Any, Any)
            return {_convert(key_tp, k, path): _convert(val_tp, v, _join(path, k)) for k, v in value.items()}
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _mismatch(tp, value, path)


def from_dict(cls: type[T], data: Mapping, *, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking types; ``where`` is the key path of this section in errors."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise _mismatch(cls, data, where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"{_join(where, key)}: unknown key for {cls.__name__} (valid keys: {', '.join(fields)}){hint}"
            )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: missing required value ({_type_name(hints[name])})")
    try:
        obj = cls(**kwargs)
        if callable(getattr(obj, "validate", None)):
            obj.validate()
    except ConfigError:
        raise
    except FieldError as e:
        raise ConfigError(f"{_join(where, e.field)}: {e.message}") from e
    except ValueError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from e
    return obj


def check_fields(section: Any, **checks: tuple[bool, str]) -> None:
    """For a dataclass's ``validate``: ``name=(ok, what a valid value is)``; raises ``ValueError`` naming the first
    field that is not ok with its value (:func:`from_dict` prefixes the section's key path)."""
    for name, (ok, valid) in checks.items():
        if not ok:
            raise FieldError(name, f"must be {valid}, got {getattr(section, name)!r}")


class FieldError(ValueError):
    """A field's value is invalid: ``field`` names it, the message says why (see :func:`check_fields`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


def to_dict(cfg: Any) -> Any:
    """``cfg`` as plain builtins (dicts, lists, str, numbers, bools, None) for ``yaml.safe_dump`` or JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def config_yaml(cfg: Any) -> str:
    """The YAML text of a config as runs save it (``config.yaml``; read back with ``yaml.safe_load``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        return raw
    if value is None and raw.strip() not in ("null", "Null", "NULL", "~"):
        return raw  # "key=" or a value that YAML reads as a comment
    return value


def apply_overrides(data: Mapping, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``dotted.key=value`` override set (the value parsed as YAML); a number
    names an item of a list (``data.mixture.0.root=/data/nyu.mat``)."""
    result = copy.deepcopy(dict(data))
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = [p.strip() for p in key.strip().split(".")]
        if not sep or not all(parts):
            raise ConfigError(f"malformed override {override!r}: expected dotted.key=value")
        node: Any = result
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    where = ".".join(parts[:i])
                    raise ConfigError(f"override {override!r}: {where} is a list of {len(node)}; {part!r} is no index")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[:i])} is not a mapping")
            elif not last and node.get(part) is None:
                node[part] = {}
            if last:
                node[part] = _parse_value(raw)
            else:
                node = node[part]
    return result


def _deep_merge(base: dict, top: Mapping) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_yaml(path: Path, chain: tuple[Path, ...], kind: str | None = None) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"config inheritance cycle: {' -> '.join(str(p) for p in (*chain, resolved))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = _deep_merge(merged, _load_yaml(_find_base(base, path, kind), (*chain, resolved), kind))
    return _deep_merge(merged, data)


def _find_base(base: str, path: Path, kind: str | None) -> Path:
    """A ``_base_`` entry of ``path``: a file relative to it, else a shipped config by path or name (of ``kind``, the
    kind of config being loaded, when known): ``_base_: mal_micro_digits`` in a user's own YAML."""
    local = path.parent / base
    if local.is_file():
        return local
    try:
        return find_config(base, kind)
    except ConfigError:
        raise ConfigError(
            f"{path}: _base_ {base!r} is neither a file next to it nor a shipped "
            f"{kind + ' ' if kind else ''}config (see mal configs)"
        ) from None


#: The configs shipped with the package (``configs/{pretrain,finetune,sweeps}/*.yaml``, package data).
SHIPPED = Path(__file__).resolve().parent / "configs"
KINDS = ("pretrain", "finetune", "sweeps")


def shipped_configs(kind: str | None = None) -> dict[str, Path]:
    """``{name: path}`` of the shipped configs (of one kind), without the ``_``-prefixed bases, sorted by name."""
    kinds = [kind] if kind else list(KINDS)
    found = {p.stem: p for k in kinds for p in sorted((SHIPPED / k).glob("*.yaml")) if not p.name.startswith("_")}
    return dict(sorted(found.items()))


def find_config(path: str | Path, kind: str | None = None) -> Path:
    """A config file from a path (absolute, or relative to the working directory), a path inside the shipped
    configs (``configs/pretrain/mal_micro_digits.yaml``, ``pretrain/mal_micro_digits.yaml``) or the name of a
    shipped config (``mal_micro_digits``; of ``kind`` when given). ``FileNotFoundError`` lists the shipped ones."""
    p = Path(path)
    if p.is_file():
        return p
    rel = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) else p
    for candidate in (SHIPPED / rel, SHIPPED / rel.with_suffix(".yaml")):
        if not p.is_absolute() and candidate.is_file():
            return candidate
    named = shipped_configs(kind).get(p.stem) if p.suffix in ("", ".yaml") and len(p.parts) == 1 else None
    if named is not None:
        return named
    names = ", ".join(shipped_configs(kind))
    raise ConfigError(f"config file not found: {path} (nor a shipped {kind + ' ' if kind else ''}config: {names})")


def load_yaml(path: str | Path, kind: str | None = None) -> dict:
    """Read a YAML mapping (see :func:`find_config` for ``path``), loading the files named by its ``_base_`` key first
    (a path relative to the file, or a shipped config's path or name, of ``kind`` when given) and deep-merging it on
    top."""
    return _load_yaml(find_config(path, kind), (), kind)


def load_config(
    cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, kind: str | None = None
) -> T:
    """Defaults of ``cls``, then the YAML file at ``path`` (if any; a shipped config's name works, of ``kind`` when
    given, see :func:`find_config`), then the ``key=value`` overrides."""
    data = load_yaml(path, kind) if path is not None else {}
    try:
        return from_dict(cls, apply_overrides(data, list(overrides)))
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}") from e


def save_config(cfg: Any, path: str | Path) -> Path:
    """Atomically write the resolved ``cfg`` as YAML, readable by ``load_config``."""
    text = yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)
    return atomic_write(path, lambda f: f.write(text))


def config_hash(cfg: Any) -> str:
    """First 12 hex digits of the SHA-256 of the canonical JSON of ``to_dict(cfg)``."""
    canonical = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# comparing configs
# ----------------------------------------------------------------------------------------------------------------


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"dotted.key": value}``."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(
    saved: str | Path,
    config: Any,
    *,
    ignore: tuple[str, ...] = (),
    free: Iterable[str] = (),
    expand: Callable[[dict], dict] | None = None,
) -> list[str]:
    """Dotted keys whose value differs between the config saved at ``saved`` (a run's ``config.yaml``) and
    ``config``, leaving out the keys in ``free`` (those that do not change results) and in ``ignore`` (with
    everything under them: ``"run"`` ignores ``run.seed``). ``expand`` maps both configs (as dicts) to the form they
    are compared in (e.g. models as built, so that an override equal to the preset's value is no change). A key that
    the saved config lacks (added to the code after the run) is no change when ``config`` has its default."""
    saved_cfg, now_cfg = yaml.safe_load(Path(saved).read_text()), to_dict(config)
    if expand is not None:
        saved_cfg, now_cfg = expand(saved_cfg), expand(now_cfg)
    old, now = flatten(saved_cfg), flatten(now_cfg)
    try:
        default = flatten(to_dict(type(config)()))
    except TypeError:  # a config class without defaults for every field
        default = {}
    free = set(free)
    under = tuple(f"{k}." for k in ignore)

    def changed(k: str) -> bool:
        if k in free or k in ignore or k.startswith(under) or old.get(k) == now.get(k):
            return False
        return k in old or k not in default or now[k] != default[k]

    return sorted(k for k in old.keys() | now.keys() if changed(k))
