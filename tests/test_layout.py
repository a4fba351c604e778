"""The architecture holds: the core never imports the command line, the library never imports the
scripts, and no import cycle runs among accum/, scripts/ and examples/ (docs/architecture.md)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_core_never_imports_the_command_line_and_the_library_never_imports_scripts():
    for path in (ROOT / "accum").rglob("*.py"):
        imports = imported_modules(path)
        assert not any(name.startswith("scripts") for name in imports), path
        if "cli" not in path.relative_to(ROOT / "accum").parts and path.name != "__main__.py":
            assert not any(name.startswith("accum.cli") for name in imports), path


def test_no_import_cycle_among_accum_scripts_and_examples():
    paths = [*(ROOT / "accum").rglob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "examples").glob("*.py")]
    modules = {module_name(p): p for p in paths}
    graph = {name: {dep for dep in imported_modules(path) if dep in modules and dep != name}
             for name, path in modules.items()}
    # the package's own __init__ re-exports its modules: edges into a package's __init__ from its
    # submodules would be the only legitimate back-edges, and there are none
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if dep == "accum" and name.startswith("accum."):
                continue  # a submodule importing the package itself only for __version__: not a cycle of code
            assert state.get(dep) != 1, " -> ".join([*trail, name, dep])
            if dep not in state:
                visit(dep, [*trail, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_only_accum_is_installed_and_nothing_refers_to_a_file_outside_the_repository():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'packages = ["accum", "accum.cli"]' in pyproject
    for path in [*ROOT.glob("**/*.py"), *ROOT.glob("**/*.md"), *ROOT.glob("**/*.yaml")]:
        if ".venv" in path.parts or "bench" in path.parts and "results" in path.parts:
            continue
        text = path.read_text(errors="replace")
        outside = ("../" + "shared", "DESIGN" + ".md")  # written so, this file does not name them itself
        assert not any(name in text for name in outside), path
