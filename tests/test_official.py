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


# ------------------------------------------------------------------------------------------------ the scripts
import benchmark_performance  # noqa: E402
import glass  # noqa: E402
import sapatchcore  # noqa: E402
import sinbad  # noqa: E402

SCRIPTS = {"sapatchcore": (sapatchcore, {"official_bn_update": True}),
           "glass": (glass, {"select_on_test": True, "official_judge_grid": True}),
           "sinbad": (sinbad, {"official_thresholds": True}),
           "benchmark_performance": (benchmark_performance, {"official_image_score": True})}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_official_turns_on_every_official_flag_of_the_script(name):
    module, expected = SCRIPTS[name]
    parser = module.build_parser()
    flags = official_flags_of(parser)
    assert flags == expected
    # every per-behaviour official flag of the script is covered by --official
    official_like = {a.dest for a in parser._actions
                     if a.dest.startswith("official_") or a.dest in ("select_on_test",)}
    assert official_like == set(flags), f"{name}: --official misses {official_like - set(flags)}"
    plain, on = parser.parse_args([]), parser.parse_args(["--official"])
    for dest, value in flags.items():
        assert getattr(plain, dest) != value, dest  # the default is not the official bug
        assert getattr(on, dest) == value, dest
    assert {k: v for k, v in vars(on).items() if k not in flags and k != "official"} == \
        {k: v for k, v in vars(plain).items() if k not in flags and k != "official"}  # nothing else moves
    help_text = " ".join(parser.format_help().split())
    for dest in flags:
        assert "--" + dest.replace("_", "-") in help_text.split("--official every official")[1].split(". An")[0]


def test_sapatchcore_bn_update_is_patchcore_only(capsys):
    with pytest.raises(SystemExit) as exc:
        sapatchcore.main(["--official-bn-update", "--weights", "random"])
    assert exc.value.code == 1 and "--method patchcore" in capsys.readouterr().err
    # --official with the SA-PatchCore method: the official SA-PatchCore has no such update, nothing to restore
    assert sapatchcore.parse_args(["--official"]).official_bn_update is True  # turned off in main, not at parse


def test_official_reaches_each_method_config():
    """--official is not only parsed: it ends up in the configuration each script builds."""
    from methods.patchcore import defaults_for

    a = sapatchcore.parse_args(["--official", "--method", "patchcore"])
    assert defaults_for(a.method, official_bn_update=a.official_bn_update or None).official_bn_update is True
    assert defaults_for("patchcore").official_bn_update is False
    cfg = glass.build_config(glass.parse_args(["--official"]))
    assert cfg.select_on_test and cfg.official_judge_grid
    cfg = glass.build_config(glass.parse_args(["--official", "--fast"]))
    assert cfg.select_on_test and cfg.official_judge_grid and cfg.meta_epochs == 20
    assert not glass.build_config(glass.parse_args([])).official_judge_grid
    assert sinbad.make_config(sinbad.parse_args(["--official"])).official_thresholds is True
    assert sinbad.make_config(sinbad.parse_args(["--official", "--fast"])).official_thresholds is True
    assert sinbad.make_config(sinbad.parse_args([])).official_thresholds is False
