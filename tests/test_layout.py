"""The package layout shows the data flow: no import circles, and no import that climbs README's Layout order.

Every ``import`` and ``from … import`` of cinecli's own modules counts, at module level and inside functions
(a function-level import that climbs is still a dependency that climbs; it only hides it from the import system).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cinecli"


def layout_order() -> list[str]:
    """Floors of README's Layout section, top first: ``- `cinecli/cli/` — …`` → 'cli', ``- `cinecli/run.py` …`` → 'run'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    floors = re.findall(r"^- `cinecli/(\w+)(?:/|\.py)`", section, flags=re.M)
    assert floors, "README's Layout section lists no `cinecli/...` floors"
    return floors


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """cinecli modules this file imports, anywhere in it, resolved to the deepest module that exists."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cinecli")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "cinecli":
                continue
            for alias in node.names:  # `from . import lock` imports the module cinecli.weights.lock
                found.add(f"{module}.{alias.name}" if is_module(f"{module}.{alias.name}") else module)
    return found - {name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str, order: list[str]) -> int | None:
    """Index of the module's floor in README's order; None for the root package (it holds only __version__)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return None if len(parts) == 1 else -1  # __main__ sits above everything: it only starts the CLI
    return order.index(parts[1]) if parts[1] in order else len(order)


def test_every_module_sits_on_a_floor_of_the_readme():
    order = layout_order()
    stray = [m for m in graph() if (f := floor(m, order)) is not None and f == len(order)]
    assert not stray, f"modules on no floor of README's Layout section: {stray}"


def test_at_most_six_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top


def test_no_import_climbs_the_layout():
    order = layout_order()
    climbs = []
    for module, deps in graph().items():
        here = floor(module, order)
        for dep in deps:
            there = floor(dep, order)
            if here is not None and there is not None and there < here:
                climbs.append(f"{module} (floor {order[here] if here >= 0 else '__main__'}) imports {dep} ({order[there]})")
    assert not climbs, "imports that climb README's Layout order:\n" + "\n".join(sorted(climbs))


def test_no_import_circles():
    deps = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    circles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(deps.get(m, ())):
            if state.get(d) == 1:
                circles.append(" → ".join(stack[stack.index(d):] + [d]))
            elif d in deps and d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The walker resolves `from ..x import y` and imports inside functions (else the two tests above prove little)."""
    deps = imports_of(PACKAGE / "batch" / "ray_driver.py")
    assert "cinecli.batch.worker" in deps  # imported inside RayWorker.__init__
    assert "cinecli.core.errors" in deps
    assert "cinecli.weights.lock" in imports_of(PACKAGE / "models" / "scan.py")  # `from ..weights import lock`
