"""The shape of the code base, checked by reading the sources (no imports of popyou_cli needed): the phase
packages and their import rules (docs/architecture.md), no circle, no command importing another, no file over 400
lines, and the declared dependencies are exactly the libraries the code imports."""
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


# Layers, bottom to top: a module imports its own layer and those below (docs/architecture.md).
LAYERS = {"core": 0, "models": 1, "third_party": 1, "store": 1, "data": 2, "train": 2, "infer": 2, "eval": 3,
          "download": 4, "bench": 5, "cli": 6}
# Within a layer, packages that must not use each other: (importer, imported).
FORBIDDEN = {("data", "train"), ("data", "infer"), ("data", "eval"), ("infer", "train"), ("infer", "eval"),
             ("store", "models"), ("store", "third_party"), ("models", "store"), ("models", "third_party")}
# The command modules: each is one command's entry; what two of them share lives below them.
COMMANDS = {"popyou_cli.data.gen_data", "popyou_cli.data.caption", "popyou_cli.data.encode",
            "popyou_cli.train.finetune", "popyou_cli.train.train_adapter", "popyou_cli.infer.sample",
            "popyou_cli.infer.demo", "popyou_cli.eval.evaluate"}
TOP_LEVEL_MODULES = {"__init__", "__main__", "download"}  # the rest of the top level is phase packages


def _graph() -> dict[str, set[str]]:
    """{module: popyou_cli modules it imports}, function-level imports included; `from package import module`
    counts as importing the module."""
    modules = {_module_of(p).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for _, module, names in _imported_modules(path):
            if not module.startswith("popyou_cli"):
                continue
            found = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            deps |= set(found) or ({module} if module in modules else set())
        deps.discard(name)
        graph[name] = deps
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_popyou_import_names_a_module_that_exists():
    """Lazy imports inside functions run only when their code does: a moved module must not leave one behind."""
    modules = {_module_of(p).removesuffix(".__init__") for p in PACKAGE.rglob("*.py")}
    tests = PACKAGE.parent / "popyou_cli_tests"
    missing = []
    for path in [*PACKAGE.rglob("*.py"), *tests.glob("*.py"), *(PACKAGE.parent / "benchmarks").glob("*.py")]:
        for line, module, names in _imported_modules(path):
            if module.startswith("popyou_cli") and module not in modules:
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{line} {module}")
    assert not missing, missing


def test_imports_point_down_only():
    offences = []
    for module, deps in sorted(_graph().items()):
        mine = _package(module)
        for dep in sorted(deps):
            theirs = _package(dep)
            if not mine or not theirs or mine == theirs or module == "popyou_cli.__main__":
                continue
            if LAYERS[theirs] > LAYERS[mine] or (mine, theirs) in FORBIDDEN:
                offences.append(f"{module} imports {dep} ({mine} may not use {theirs})")
    assert not offences, "\n".join(offences)


def test_no_command_module_imports_another():
    offences = [f"{m} imports {d}" for m, deps in _graph().items() if m in COMMANDS for d in deps if d in COMMANDS]
    assert not offences, "\n".join(offences)


def test_nothing_imports_cli_or_bench():
    offences = [f"{m} imports {d}" for m, deps in _graph().items() for d in deps
                if _package(d) in ("cli", "bench") and _package(m) not in ("cli", _package(d))
                and m != "popyou_cli.__main__"]
    assert not offences, "\n".join(offences)


def test_no_import_circle():
    """Tarjan's strongly connected components over every import (lazy ones too): none larger than one module."""
    graph, index, low, stack, on_stack, circles = _graph(), {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_top_level_is_phase_packages():
    loose = {p.stem for p in PACKAGE.glob("*.py")} - TOP_LEVEL_MODULES
    assert not loose, f"loose modules at the top of popyou_cli: {sorted(loose)}"
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(LAYERS) - {"download"}


def test_no_file_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_nothing_cites_files_outside_the_repo():
    """Users never get ../shared: the package and tests name only the golden data's location (an env var)."""
    sources = [*PACKAGE.rglob("*.py"), *(p for p in (PACKAGE.parent / "popyou_cli_tests").glob("*.py")
                                         if p.name != "test_layout.py")]  # this file spells the pattern
    offences = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in sources
                for i, line in enumerate(p.read_text().splitlines(), 1)
                if re.search(r"shared/docs|docs/(var-spec|seed-system|style)\.md", line)]
    assert not offences, offences


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
