"""Project-wide code rules that a reviewer would otherwise have to check by eye."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "methods", "models", "dataset_readers", "evaluation", "benchmarks")


def _sources():
    yield from sorted(ROOT.glob("*.py"))
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def long_positional_signatures(source: str) -> list[tuple[int, str, int]]:
    """(line, name, positional parameter count) of every function with more than five positional parameters."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            n = len([p for p in a.posonlyargs + a.args if p.arg not in ("self", "cls")])
            if n > 5:
                found.append((node.lineno, node.name, n))
    return found


def test_functions_with_more_than_five_parameters_take_keyword_only_arguments():
    offenders = [f"{path.relative_to(ROOT)}:{line} {name}({n} positional)"
                 for path in _sources() for line, name, n in long_positional_signatures(path.read_text())]
    assert not offenders, "put a * after the leading parameters:\n" + "\n".join(offenders)


def test_the_rule_flags_a_long_positional_signature_and_accepts_the_fix():
    assert long_positional_signatures("def f(a, b, c, d, e, g):\n    pass\n") == [(1, "f", 6)]
    assert long_positional_signatures("class C:\n    def m(self, a, b, c, d, e):\n        pass\n") == []
    assert long_positional_signatures("def f(a, b, *, c, d, e, g):\n    pass\n") == []
