"""The distribution's version has one owner, `itvnode_version`, at the bottom of the import graph."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import itvnode_version

ROOT = Path(__file__).resolve().parents[2]


def test_itvnode_version_imports_only_the_standard_library() -> None:
    # import-linter cannot take a single module as a root package, so this is its contract.
    tree = ast.parse(Path(itvnode_version.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in itvnode_version"
            assert node.module is not None
            imported.add(node.module.split(".")[0])
    not_stdlib = sorted(imported - set(sys.stdlib_module_names) - {"__future__"})
    assert not not_stdlib, f"itvnode_version must import only the standard library, imports {not_stdlib}"


def test_the_cli_and_the_library_report_the_same_version() -> None:
    import itvnode

    assert itvnode.__version__ == itvnode_version.__version__
    cmd = [sys.executable, "-m", "itvnode.cli", "--version"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"itvnode {itvnode_version.__version__}"


def test_the_version_comes_from_the_installed_metadata_written_from_pyproject() -> None:
    import tomllib
    from importlib.metadata import version

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert itvnode_version.__version__ == version("itvnode")
    assert itvnode_version.__version__ == declared, "installed metadata is stale: run make install"


def test_a_tree_that_was_never_installed_says_so() -> None:
    assert itvnode_version.distribution_version("itvnode-not-installed-anywhere") == itvnode_version.UNKNOWN


def test_library_code_writes_that_version() -> None:
    import service.dicomio.encapsulated_pdf
    import service.dicomio.output
    import service.dicomio.seg
    import service.dicomio.structure_set

    for module in (service.dicomio.output, service.dicomio.structure_set, service.dicomio.seg,
                   service.dicomio.encapsulated_pdf):
        assert module.__version__ is itvnode_version.__version__, module.__name__
