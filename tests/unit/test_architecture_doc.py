"""docs/architecture.md names real code: every ``package.module.name`` in it exists, and every module of the
three packages appears in its package table (a new module is placed on the map when it is added)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "architecture.md").read_text()
PACKAGES = ("service", "worker", "models")


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defines(path: Path, names: list[str]) -> bool:
    """``names`` (e.g. ["Spool", "store"]) is a top-level definition, or a class attribute, of ``path``."""
    body: list[ast.stmt] = ast.parse(path.read_text()).body
    for name in names:
        found = None
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
                found = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found = node
        if found is None:
            return False
        body = found.body if isinstance(found, ast.ClassDef) else []
    return True


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = _module_file(".".join(parts[:cut]))
        if path is not None:
            return cut == len(parts) or _defines(path, parts[cut:])
    return False


def test_every_named_function_exists() -> None:
    names = sorted(set(re.findall(r"`((?:service|worker|models)\.[A-Za-z_][\w.]*)`", DOC)))
    assert len(names) > 30
    missing = [n for n in names if not _resolves(n)]
    assert not missing, f"docs/architecture.md names code that does not exist: {missing}"


def test_every_module_is_on_the_map() -> None:
    missing = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if path.name == "__init__.py" or "__pycache__" in rel.parts:
                continue
            if f"`{path.stem}`" not in DOC and f"`{path.parent.name}/`" not in DOC:
                missing.append(str(rel))
    assert not missing, f"modules missing from docs/architecture.md's package table: {missing}"
