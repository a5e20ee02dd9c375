"""common/official.py: --official sets every listed dest after parsing; an explicit flag keeps its value."""
import argparse

import pytest

from common.official import add_official_switch, apply_official, official_flags_of


def _parser():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--official-thresholds", action="store_true")
    p.add_argument("--distribution", type=int, default=0)
    p.add_argument("--resize", type=int, nargs="+", default=None)
    p.add_argument("--name", default="x")
    add_official_switch(p, {"official_thresholds": True, "distribution": 1, "resize": [256]})
    return p


def test_default_untouched_and_official_sets_all():
    p = _parser()
    a = p.parse_args([])
    assert (a.official, a.official_thresholds, a.distribution, a.resize, a.name) == (False, False, 0, None, "x")
    a = p.parse_args(["--official"])
    assert (a.official, a.official_thresholds, a.distribution, a.resize, a.name) == (True, True, 1, [256], "x")


def test_explicit_flag_wins_even_when_equal_to_default():
    p = _parser()
    a = p.parse_args(["--distribution", "0", "--official", "--resize", "300", "301"])
    assert a.distribution == 0 and a.resize == [300, 301] and a.official_thresholds is True


def test_help_lists_flags_and_mapping_is_a_copy():
    p = _parser()
    text = p.format_help()
    for piece in ("--official-thresholds", "--distribution 1", "--resize 256"):
        assert piece in " ".join(text.split())
    flags = official_flags_of(p)
    flags["distribution"] = 5
    assert official_flags_of(p)["distribution"] == 1
    a = p.parse_args(["--official"])
    a.resize.append(1)
    assert p.parse_args(["--official"]).resize == [256]


def test_unknown_dest_and_wrong_const_refused():
    p = argparse.ArgumentParser()
    p.add_argument("--flag", action="store_true")
    with pytest.raises(ValueError, match="nope"):
        add_official_switch(p, {"nope": 1})
    with pytest.raises(ValueError, match="stores"):
        add_official_switch(p, {"flag": False})
    with pytest.raises(ValueError):
        official_flags_of(argparse.ArgumentParser())


def test_apply_official_standalone():
    ns = argparse.Namespace(official=True, a=0, b=0)
    apply_official(ns, {"a": 1, "b": 2}, explicit={"b"})
    assert (ns.a, ns.b) == (1, 0)
    ns = argparse.Namespace(official=False, a=0)
    assert apply_official(ns, {"a": 1}).a == 0
