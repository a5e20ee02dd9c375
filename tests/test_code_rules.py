"""Project-wide code rules that a reviewer would otherwise have to check by eye."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "methods", "models", "dataset_readers", "evaluation", "benchmarks")


def _sources():
    yield from sorted(ROOT.glob("*.py"))
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_functions_with_more_than_five_parameters_take_keyword_only_arguments():
    offenders = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                positional = [p.arg for p in a.posonlyargs + a.args if p.arg not in ("self", "cls")]
                if len(positional) > 5:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({len(positional)} positional)")
    assert not offenders, "put a * after the leading parameters:\n" + "\n".join(offenders)


def test_the_rule_sees_a_long_positional_signature(tmp_path):
    # The checker above must flag what it is meant to flag (and accept the fix).
    bad = ast.parse("def f(a, b, c, d, e, g):\n    pass\n").body[0]
    good = ast.parse("def f(a, b, *, c, d, e, g):\n    pass\n").body[0]
    count = lambda n: len([p for p in n.args.posonlyargs + n.args.args if p.arg not in ("self", "cls")])
    assert count(bad) == 6 and count(good) == 2
