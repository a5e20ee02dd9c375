"""One `--official` switch per method script: every official behaviour (including the official codes' known bugs)
at once, so that a researcher gets the official code's numbers with one word. The fine-grained flags stay.

    flags = {"official_thresholds": True, "distribution": 1}
    add_official_switch(parser, flags)      # registers --official, whose help lists what it turns on
    args = parser.parse_args(argv)          # --official already applied; an explicit flag still wins

`flags` maps an argparse dest to its official value. After parsing, `--official` sets every listed dest the user
did not give explicitly on the command line; a flag given explicitly keeps the user's value (so
`--official --distribution 0` is the official code with one behaviour changed back).
"""
from __future__ import annotations

import argparse
from typing import Iterable, Mapping

OFFICIAL_DEST = "official"
_FLAGS_ATTR = "_official_flags"


class _Unset:
    """Pre-seeded into the namespace of a probe parse: a dest still holding it was not given on the command line
    (argparse only fills defaults for attributes the namespace lacks)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def _action_of(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    for action in parser._actions:
        if action.dest == dest:
            return action
    raise ValueError(f"--official lists {dest!r}, which is no option of this parser")


def _flag_text(action: argparse.Action, value: object) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        pos = [o for o in action.option_strings if not o.startswith("--no-")]
        neg = [o for o in action.option_strings if o.startswith("--no-")]
        return (pos if value else neg or pos)[0]
    longs = [o for o in action.option_strings if o.startswith("--")] or list(action.option_strings)
    name = max(longs, key=len)
    if action.nargs == 0:  # store_true / store_false / store_const: the flag alone says it
        return name
    if isinstance(value, (list, tuple)):
        return f"{name} {' '.join(str(v) for v in value)}"
    return f"{name} {value}"


def add_official_switch(parser: argparse.ArgumentParser, flags: Mapping[str, object],
                        help_extra: str = "") -> argparse.Action:
    """Register `--official` on `parser` (which must already hold every option named in `flags`) and hook its
    parsing so that `--official` sets each listed dest to its official value after parsing."""
    flags = dict(flags)
    if hasattr(parser, _FLAGS_ATTR):
        raise ValueError("add_official_switch was already called on this parser")
    parts = []
    for dest, value in flags.items():
        action = _action_of(parser, dest)
        if isinstance(action, argparse._AppendAction):
            raise ValueError(f"--official cannot set the append option {dest!r}")
        if isinstance(action, argparse.BooleanOptionalAction):  # common.config's boolean fields: --x / --no-x
            if not isinstance(value, bool):
                raise ValueError(f"--official sets the boolean option {dest!r} to {value!r}")
        elif action.nargs == 0 and value != action.const:
            raise ValueError(f"--official sets {dest!r} to {value!r}, but its flag stores {action.const!r}")
        parts.append(_flag_text(action, value))
    listed = ", ".join(parts) if parts else "nothing yet"
    text = f"every official behaviour at once, known bugs included: {listed}"
    if help_extra:
        text += f"; {help_extra}"
    text += ". An explicit flag still wins."
    switch = parser.add_argument("--official", dest=OFFICIAL_DEST, action="store_true",
                                 help=text.replace("%", "%%"))
    setattr(parser, _FLAGS_ATTR, flags)

    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = original(args, namespace)
        if getattr(ns, OFFICIAL_DEST, False) and flags:
            probe = argparse.Namespace(**{d: _UNSET for d in flags})
            # Same argv again: it already parsed once, so it parses again; errors/--help have exited above.
            original(args, probe)
            explicit = {d for d in flags if getattr(probe, d) is not _UNSET}
            apply_official(ns, flags, explicit)
        return ns, extras

    parser.parse_known_args = parse_known_args  # parse_args goes through parse_known_args
    return switch


def apply_official(args: argparse.Namespace, flags: Mapping[str, object],
                   explicit: Iterable[str] = ()) -> argparse.Namespace:
    """If `args.official` is set, set every dest of `flags` to its official value, except the `explicit` ones
    (given on the command line). Lists are copied so that a later edit does not change `flags`."""
    if not getattr(args, OFFICIAL_DEST, False):
        return args
    keep = set(explicit)
    for dest, value in flags.items():
        if dest not in keep:
            setattr(args, dest, list(value) if isinstance(value, (list, tuple)) else value)
    return args


def official_flags_of(parser: argparse.ArgumentParser) -> dict[str, object]:
    """The dest -> official value mapping that `--official` applies on `parser` (for tests and docs)."""
    flags = getattr(parser, _FLAGS_ATTR, None)
    if flags is None:
        raise ValueError("this parser has no --official switch (add_official_switch was not called)")
    return dict(flags)
