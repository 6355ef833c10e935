"""The shape of the code base, checked by reading the sources (no imports of popyou_cli needed):
stages never import each other, and the declared dependencies are exactly the libraries the code imports."""
import ast
import importlib.metadata
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "popyou_cli"
PYPROJECT = PACKAGE.parent / "pyproject.toml"

# Declared but not imported by name, and why.
USED_WITHOUT_IMPORT = {
    "torchvision": "open_clip imports it; pinned here to the torch versions popyou supports",
    "sentencepiece": "transformers needs it to load (and convert) SigLIP's sentencepiece tokenizer",
    "protobuf": "transformers needs it to convert a sentencepiece tokenizer to a fast one",
}


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in `path`, relative imports resolved."""
    package = _module_of(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def test_no_stage_imports_another_stage():
    """A stage (popyou_cli/stages/*.py) may import the shared layers below it, never another stage: what two
    stages share moves down a layer under a public name."""
    stages = {p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__"}
    offences = []
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        for line, module, names in _imported_modules(path):
            targets = []
            if module.startswith("popyou_cli.stages."):
                targets.append(module.split(".")[2])
            elif module == "popyou_cli.stages":
                targets += [n for n in names if n in stages]
            offences += [f"stages/{path.name}:{line} imports stages/{t}.py" for t in targets if t != path.stem]
    assert not offences, "\n".join(offences)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = list(project["dependencies"])
    for extra, deps in project.get("optional-dependencies", {}).items():
        if extra != "test":
            specs += deps
    return {_normalise(re.match(r"[A-Za-z0-9_.\-]+", spec).group(0)) for spec in specs}


def _imported_distributions() -> dict[str, str]:
    """Third-party distributions popyou_cli imports: {distribution: first file that imports it}."""
    by_module = importlib.metadata.packages_distributions()
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for _, module, _ in _imported_modules(path):
            top = module.split(".")[0]
            if not top or top in sys.stdlib_module_names or top == "popyou_cli" or top == "__future__":
                continue
            dists = by_module.get(top)
            where = path.relative_to(PACKAGE.parent)
            assert dists, f"{where} imports '{top}', which no installed distribution provides"
            found.setdefault(_normalise(dists[0]), str(path.relative_to(PACKAGE.parent)))
    return found


def test_declared_dependencies_match_imports():
    declared, imported = _declared(), _imported_distributions()
    undeclared = {d: f for d, f in imported.items() if d not in declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = declared - set(imported) - {_normalise(d) for d in USED_WITHOUT_IMPORT}
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
