"""Configuration: dataclasses with defaults -> YAML file -> dotted ``key=value`` overrides.

Every stage describes its settings as a (possibly nested) dataclass. ``load_config`` builds one
from the defaults, then a YAML experiment file, then command-line overrides such as
``optim.lr=1e-4 model.moe.num_experts=8``. Unknown keys and wrongly typed values are errors that
name the key (and the closest valid one), never silently ignored. Values are checked too, before any
work starts: a field declares its range next to its default (``batch_size: Annotated[int, POSITIVE] = 64``)
and a dataclass may add checks across its fields in ``config_errors(prefix)``. ``save_config`` writes
the resolved config next to a stage's outputs so every result records what made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from pipeline.errors import ClaspError
from pipeline.resources import config_path

T = TypeVar("T")


class ConfigError(ClaspError, ValueError):
    """A user mistake in a config file or override; the message says what to fix."""


@dataclass(frozen=True)
class Check:
    """A range a setting must lie in, declared in its annotation: ``Annotated[int, POSITIVE]``.
    Applied to every element of a list/tuple value; ``None`` (where the type allows it) always passes."""

    ok: Callable[[Any], bool]
    need: str  # completes "must be ...", e.g. "> 0"


POSITIVE = Check(lambda v: v > 0, "> 0")
NON_NEGATIVE = Check(lambda v: v >= 0, ">= 0")
AT_LEAST_ONE = Check(lambda v: v >= 1, ">= 1")
PROBABILITY = Check(lambda v: 0 <= v <= 1, "between 0 and 1")


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low:g}")


def check_config(cfg: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first setting of ``cfg`` (nested dataclasses included) outside its range."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_config(value, prefix=f"{prefix}{f.name}.")
            continue
        checks = [c for c in typing.get_args(hints[f.name])[1:] if isinstance(c, Check)]
        if typing.get_origin(hints[f.name]) is not Annotated or value is None:
            continue
        items = value if isinstance(value, list | tuple) else [value]
        for check in checks:
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and check.ok(v) for v in items):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{prefix}{f.name}={shown} is out of range: it must be {check.need}")
    errors = cfg.config_errors(prefix) if hasattr(cfg, "config_errors") else []
    if errors:
        raise ConfigError(errors[0])


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(options))})"


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raise ConfigError naming ``where``."""
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        return _to_dataclass(value, tp, where)
    convert = _CONVERTERS.get(typing.get_origin(tp) or tp)
    return value if convert is None else convert(value, tp, where)


def _to_dataclass(value: Any, tp: type, where: str) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
    return _from_dict(tp, value, prefix=where + ".")


def _to_annotated(value: Any, tp: Any, where: str) -> Any:
    return _coerce(value, typing.get_args(tp)[0], where)  # the range is checked on the finished config


def _to_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, arg, where)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")


# YAML 1.1 reads these words as booleans: a choice of words such as mixed_precision (no | bf16 | fp16) gets its
# word back, so `mixed_precision: no` in a file means "no", as typed
_YAML_BOOL_WORDS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}


def _to_literal(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if isinstance(value, bool) and all(isinstance(a, str) for a in args):
        words = [w for w in _YAML_BOOL_WORDS[value] if w in args]
        if not words:
            spelled = "/".join(_YAML_BOOL_WORDS[value])
            raise ConfigError(f"{where}: {spelled} (YAML's {str(value).lower()}) is not one of {list(args)}")
        value = words[0]
    if value not in args:
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    return value


def _to_sequence(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, str | int | float) and not isinstance(value, bool) and origin is not None:
        value = [value]
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    items = [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if (origin or tp) is tuple else items


def _to_mapping(value: Any, tp: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _to_bool(value: Any, tp: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected true/false, got {value!r}")


def _to_int(value: Any, tp: Any, where: str) -> int:
    if _is_number(value) and float(value).is_integer():
        return int(value)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _to_float(value: Any, tp: Any, where: str) -> float:
    with contextlib.suppress(TypeError, ValueError):
        if _is_number(value) or isinstance(value, str):
            return float(value)
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _to_str(value: Any, tp: Any, where: str) -> str:
    if isinstance(value, str) or _is_number(value):
        return str(value)
    raise ConfigError(f"{where}: expected a string, got {value!r}")


def _to_path(value: Any, tp: Any, where: str) -> Path:
    if isinstance(value, str | Path):
        return Path(value)
    raise ConfigError(f"{where}: expected a path, got {value!r}")


# annotation (its typing origin, else the type itself) -> converter; other types pass values through
_CONVERTERS: dict[Any, Callable[[Any, Any, str], Any]] = {
    Annotated: _to_annotated,
    typing.Union: _to_union,
    types.UnionType: _to_union,
    typing.Literal: _to_literal,
    list: _to_sequence,
    tuple: _to_sequence,
    dict: _to_mapping,
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: _to_path,
}


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Validated dict -> dataclass (the step ``load_config`` ends with), for configs stored inside files."""
    cfg = _from_dict(cls, data, prefix)
    check_config(cfg, prefix)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (paths as strings, tuples as lists) ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def _leaf(tree: dict[str, Any], cls: type, dotted: str) -> tuple[dict[str, Any], str, Any]:
    """(the dict that holds setting ``a.b.c`` in a nested ``tree`` of ``cls``, ``c``, its annotation);
    the path is checked against ``cls``."""
    *groups, name = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate([*groups, name]):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if part not in names:
            raise ConfigError(f"unknown config key '{'.'.join([*groups, name][: i + 1])}'{_closest(part, names)}")
        tp = typing.get_type_hints(node_cls)[part]
        if i == len(groups):
            break
        if not _is_dataclass_type(tp):
            raise ConfigError(f"config key '{'.'.join(groups[: i + 1])}' is a value, not a group of settings")
        node, node_cls = node.setdefault(part, {}), tp
    return node, name, tp


def _set_dotted(tree: dict[str, Any], cls: type, dotted: str, raw: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict, validating the path against ``cls``."""
    node, name, tp = _leaf(tree, cls, dotted)
    value = yaml.safe_load(raw) if raw != "" else ""
    # YAML reads `no`/`on`/`1.0` as bool/number; a string setting keeps the text as typed
    node[name] = raw if _wants_string(tp) and value is not None and not isinstance(value, str) else value


def _wants_string(tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str:
        return True
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return len(rest) == 1 and _wants_string(rest[0])
    return False


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    flags: dict[str, Any] | None = None,
) -> T:
    """Defaults of ``cls`` <- YAML ``path`` <- ``overrides`` (``["a.b=1", ...]``) <- ``flags``; validated.

    ``flags`` are settings already parsed by the command line (``{"quiet": False, "backbone.spec": ...}``);
    a ``None`` value means "not given" and is skipped, so a flag can set false over a file's true."""
    tree = to_dict(cls())
    if path is not None:
        path = config_path(path)  # a relative configs/... path also names the shipped copy from any folder
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings at the top level")
        try:
            _from_dict(cls, loaded)  # validate keys/types with the file named in the error
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        _deep_update(tree, loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, cls, key.strip(), raw.strip())
    for key, value in (flags or {}).items():
        if value is not None:
            node, name, _ = _leaf(tree, cls, key)
            node[name] = to_dict(value)  # paths as text, tuples as lists: the tree holds what YAML would
    cfg = _from_dict(cls, tree)
    check_config(cfg)
    return cfg


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


# --- `clasp config CMD`: every setting with its default and help ------------------------------------


def field_help(cls: type) -> dict[str, str]:
    """One line of help per field of dataclass ``cls``: the comment on its line, else the comment lines
    right above it (the source is the documentation, so help cannot drift from the code)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    names = {f.name for f in dataclasses.fields(cls)}
    helps: dict[str, str] = {}
    for number, line in enumerate(source.splitlines(), start=1):
        head = line[:4] == "    " and line[4:5].isidentifier() and line[4:].split(":", 1)
        if not head or len(head) != 2 or head[0] not in names:
            continue
        text = comments.get(number)
        if text is None:  # full-line comments directly above
            above, k = [], number - 1
            while k in comments and k not in code_lines:
                above.insert(0, comments[k])
                k -= 1
            text = " ".join(above)
        helps[head[0]] = text
    for base in cls.__mro__[1:]:  # a field declared in a base dataclass (e.g. a task's shared settings) keeps its help
        if dataclasses.is_dataclass(base):
            helps.update({name: text for name, text in field_help(base).items() if not helps.get(name)})
    return helps


def _kind(tp: Any) -> str:
    """Short type/range text: "int, > 0", "one of no | bf16 | fp16", "path or null"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        checks = [c.need for c in args[1:] if isinstance(c, Check)]
        return ", ".join([_kind(args[0]), *checks])
    if origin is typing.Literal:
        return "one of " + " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [_kind(a) for a in args if a is not type(None)]
        return " or ".join(rest) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("...").strip()


def describe_config(cls: type, *, title: str, values: Any = None) -> str:
    """Every setting of ``cls`` as commented YAML: its defaults (or those of ``values``, a resolved config),
    each with its help and type; loadable as is."""
    lines = [
        f"# {title}: every setting with its default. Save as a file, keep the lines you change,",
        "# and pass it with --config FILE (or give single settings as key=value after the command).",
    ]

    def walk(node_cls: type, defaults: dict[str, Any], indent: str) -> None:
        hints = typing.get_type_hints(node_cls, include_extras=True)
        helps = field_help(node_cls)
        for f in dataclasses.fields(node_cls):
            if not f.init:
                continue
            tp, value = hints[f.name], defaults[f.name]
            bare = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
            if _is_dataclass_type(bare):
                doc = helps.get(f.name) or (inspect.getdoc(bare) or "").split("\n")[0]
                lines.append(f"{indent}{f.name}:" + (f"  # {doc}" if doc else ""))
                walk(bare, value, indent + "  ")
                continue
            text = helps.get(f.name, "")
            lines.append(
                f"{indent}{f.name}: {_yaml_value(value)}  # " + (f"{text} " if text else "") + f"({_kind(tp)})"
            )

    walk(cls, to_dict(values if values is not None else cls()), "")
    return "\n".join(lines) + "\n"
