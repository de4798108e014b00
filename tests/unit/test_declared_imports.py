"""Every third-party module the package, its tests and benchmarks import is declared in pyproject.toml
(dependencies or an extra) or installed by the Makefile, so a fresh environment built from them runs the
tests: a module that happens to be on a developer's machine cannot make the suite pass."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"loraforge"} | {p.stem for p in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]}


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared() -> set[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {_requirement_name(r) for r in project.get("dependencies", [])}
    for reqs in project.get("optional-dependencies", {}).values():
        names |= {_requirement_name(r) for r in reqs}
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for line in re.findall(r"\binstall\b[^\n]*", makefile):
        names |= {w.lower() for w in line.split()[1:] if not w.startswith(("-", "'", ".", "$"))}
    return names


def imported_modules() -> dict[str, set[str]]:
    """top-level module -> files importing it (imports anywhere in a file, and pytest.importorskip)."""
    found: dict[str, set[str]] = {}
    files = [*ROOT.glob("src/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names = [node.args[0].value]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared() -> None:
    owners = importlib.metadata.packages_distributions()
    wanted = declared()
    missing = []
    for module, files in sorted(imported_modules().items()):
        if module in sys.stdlib_module_names or module in FIRST_PARTY or module.startswith("_"):
            continue
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [])}
        if not dists:
            missing.append(f"{module} (not installed here; imported by {sorted(files)[0]})")
        elif not dists & wanted:
            missing.append(f"{module} from {'/'.join(sorted(dists))} (imported by {sorted(files)[0]})")
    assert not missing, "undeclared imports: " + "; ".join(missing)
