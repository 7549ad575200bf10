"""`make lint`'s function-length gate: no function over MAX_LINES lines in the project's code.

Covers the service (api, shared, worker), the client, the scripts, the benchmarks and the tests
(not tests/data, which holds fixtures, not code).

Counts a function's lines from `def` to its last line, less its docstring. Exempt, as issue 9
and STYLE.md allow: layer-building `__init__`s, the model's `forward`s in `worker/m2fp/` (they
only move named tensors), and a function whose `def` line is preceded by a comment
`# long-by-design: <reason>` (declarative tables such as an argument parser or the OpenAPI
document). Prints each offender as `path:line name (N lines)` and exits 1 if there is any.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_LINES = 42  # "~40": a signature split over a few lines does not tip a function over
ROOTS = ("api", "shared", "worker", "client/m2fp_client", "scripts", "bench", "tests")
EXCLUDED = ("tests/data",)  # fixtures and golden files, not code
MARKER = "# long-by-design:"


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of `node` without its docstring."""
    lines = (node.end_lineno or node.lineno) - node.lineno + 1
    first = node.body[0]
    if ast.get_docstring(node) is not None and isinstance(first, ast.Expr):
        lines -= (first.end_lineno or first.lineno) - first.lineno + 1
    return lines


def exempt(path: Path, node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> bool:
    """Whether `node` may be long: see the module docstring."""
    if node.name == "__init__":
        return True
    if node.name == "forward" and path.parts[:2] == ("worker", "m2fp"):
        return True
    first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
    return first >= 2 and source[first - 2].strip().startswith(MARKER)


def offenders(root: Path) -> Iterator[str]:
    """`path:line name (N lines)` for every too-long function under the roots."""
    for top in ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            relative = path.relative_to(root)
            if any(relative.is_relative_to(excluded) for excluded in EXCLUDED):
                continue
            text = path.read_text(encoding="utf-8")
            source = text.splitlines()
            for node in ast.walk(ast.parse(text, filename=str(relative))):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                lines = body_lines(node)
                if lines > MAX_LINES and not exempt(relative, node, source):
                    yield f"{relative}:{node.lineno} {node.name} ({lines} lines)"


def main() -> int:
    """Print the offenders; exit status 1 if any."""
    found = list(offenders(Path(__file__).resolve().parent.parent))
    for line in found:
        print(f"{line}: over {MAX_LINES} lines; split it (or mark a declarative table)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
