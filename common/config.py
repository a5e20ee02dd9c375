"""One configuration mechanism for every script: a method's settings are one dataclass whose field defaults are
the paper/official values, with a `fast()` preset; `add_config_args` turns it into argparse flags and
`config_from_args` builds it back: the `--fast` preset first, then every flag given explicitly.

    @dataclass
    class FooConfig:
        iterations: int = opt(60000, "training iterations")
        size: tuple[int, ...] = opt((256, 256), "input H W", flag="--input-size")
        padding: bool = opt(True, "student with padding")          # --padding / --no-padding

        @classmethod
        def fast(cls, **over):                                      # tiny sizes for tests and the demo
            return cls(**{"iterations": 300, **over})

    add_config_args(parser, FooConfig)                              # --iterations, --input-size, --padding
    cfg = config_from_args(FooConfig, args)                         # args.fast -> FooConfig.fast(), then flags

Each flag's default is None, so "given" and "not given" differ even when the value equals the default (the old
`--fast --projections 1000` bug); its help is the field's one-line help plus "default X; --fast Y".
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable, Mapping, TypeVar

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def opt(default: Any = _MISSING, help: str = "", *, flag: str | None = None, aliases: Iterable[str] = (),
        choices: Iterable[Any] | None = None, type: Any = None, cli: bool = True, default_factory: Any = _MISSING,
        metavar: str | None = None) -> Any:
    """A dataclass field with its command-line description. `flag`: the option name (default --field-name);
    `aliases`: further names of the same option; `type`: element type when the default does not tell it (None or
    an empty tuple); `cli=False`: not a flag (set by code only)."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": None if choices is None else
            tuple(choices), "type": type, "cli": cli, "metavar": metavar}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def presets(cls: type) -> tuple[Any, Any | None]:
    """(cls(), cls.fast()) — the full defaults and the --fast preset (None if the class has none). A class whose
    field is named `fast` names its preset `fast_config`."""
    fast = getattr(cls, "fast", None)
    if not callable(fast):
        fast = getattr(cls, "fast_config", None)
    return cls(), (fast() if callable(fast) else None)


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return " ".join(_fmt(x) for x in v) if v else "()"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.init]


def add_config_args(parser: argparse.ArgumentParser | Any, cls: type, *, title: str | None = None,
                    skip: Iterable[str] = (), help_overrides: Mapping[str, str] | None = None):
    """Add one flag per field of `cls` (skipping `skip` and fields with cli=False) to a new argument group named
    `title` (default: the class name). Every flag defaults to None; see config_from_args."""
    skip, help_overrides = set(skip), dict(help_overrides or {})
    full, fast = presets(cls)
    group = parser.add_argument_group(title or cls.__name__) if isinstance(parser, argparse.ArgumentParser) \
        else parser
    for f in cli_fields(cls):
        if f.name in skip:
            continue
        m = f.metadata
        d = getattr(full, f.name)
        text = help_overrides.get(f.name, m.get("help") or f.name.replace("_", " "))
        dflt = f"default {_fmt(d)}"
        if fast is not None and getattr(fast, f.name) != d:
            dflt += f"; --fast {_fmt(getattr(fast, f.name))}"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f"{text} ({dflt})".replace("%", "%%")}
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        if m.get("choices") is not None:
            kw["choices"] = list(m["choices"])
        names = [flag_of(f), *m.get("aliases", ())]
        if isinstance(d, bool):
            kw["action"] = argparse.BooleanOptionalAction
            kw.pop("metavar", None)
        elif isinstance(d, (tuple, list)):
            elem = m.get("type") or (type(d[0]) if d else str)
            kw.update(nargs="+", type=elem)
        else:
            kw["type"] = m.get("type") or (type(d) if d is not None else str)
        group.add_argument(*names, **kw)
    return group


def explicit_overrides(cls: type, args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """{field: value} for every config flag given on the command line (non-None in `args`)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    out = {}
    for f in cli_fields(cls):
        v = values.get(f.name)
        if v is None:
            continue
        if isinstance(v, list):
            v = tuple(v)
        out[f.name] = v
    return out


def config_from_args(cls: type[T], args: argparse.Namespace | Mapping[str, Any], *, fast: bool | None = None,
                     **fixed: Any) -> T:
    """`cls.fast()` if `fast` (default: args.fast) else `cls()`, then every explicitly given flag, then `fixed`
    (values the script sets itself, e.g. seed)."""
    if fast is None:
        fast = bool(getattr(args, "fast", False) if isinstance(args, argparse.Namespace) else
                    dict(args).get("fast", False))
    full, fast_cfg = presets(cls)
    base = fast_cfg if fast and fast_cfg is not None else full
    return dataclasses.replace(base, **{**explicit_overrides(cls, args), **fixed})
