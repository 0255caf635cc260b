"""The library's layering (docs/architecture.md), read from the source: which module may import
which, no cycles, and a reason beside every import made inside a function.

Each check names the offending import as file:line; the planted-violation tests prove they fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "platform"

# Matched by prefix: a new module in a package is covered without editing this test.
TRAINING = ("attune.train",)
TUNING = ("attune.tune",)
SERVING = ("attune.serve",)
PAGE = ("attune.ui",)
# The command line and the demo sit on top of everything; nothing imports them.
ENTRY = ("attune.cli", "attune.__main__", "attune.commands", "attune.demo")
# The repository's configs and thin entry points; the library never imports them.
OUTSIDE = ("deployments", "tuning", "ui", "recipes", "tests", "bench")

# (who, what they must not import, why)
RULES = [
    (SERVING + PAGE, TRAINING + TUNING, "serving and the page never import training or tuning"),
    (TRAINING, SERVING + PAGE + TUNING, "training never imports serving, the page or tuning"),
    (PAGE, SERVING, "the page talks to any OpenAI endpoint, not to attune's serving code"),
]
# The one module that imports Ray's private names (attune/ray_internals.py says why, name by name).
RAY_INTERNALS = "attune.ray_internals"
# Where importing inside a function needs no comment of its own: each subcommand loads the
# library when it runs, for the command's start-up time (attune/commands/__init__.py says so).
LAZY_BY_DESIGN = ("attune.commands",)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. attune.serve.app
    target: str  # the imported module, e.g. attune.train.trainer
    where: str  # file:line
    nested: bool  # inside a function or class body
    commented: bool  # a comment on its line or the line above (for a run of imports: the first)
    names: tuple[str, ...] = ()  # what `from target import ...` takes, e.g. ("_get_global_client",)

    def __str__(self) -> str:
        return f"{self.where}: {self.module} imports {self.target}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports(root: Path, package: str = "attune", shown_from: Path | None = None) -> list[Import]:
    """Every import statement of the package's modules under `root`; files are named relative
    to `shown_from` (default: `root`)."""
    found = []
    modules = {module_name(p, root) for p in (root / package).rglob("*.py")}
    for path in sorted((root / package).rglob("*.py")):
        module = module_name(path, root)
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source, filename=str(path))
        for node, nested, first_of_run in _walk(tree):
            for target in dict.fromkeys(_targets(node, module, path.name == "__init__.py", modules)):
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                here = lines[node.lineno - 1]
                commented = "#" in here or above.startswith("#") or not first_of_run
                names = tuple(a.name for a in node.names) if isinstance(node, ast.ImportFrom) else ()
                found.append(Import(module, target, f"{path.relative_to(shown_from or root)}:{node.lineno}",
                                    nested, commented, names))
    return found


def _walk(tree: ast.Module):
    """(import node, inside a function or class, first of a run of consecutive imports)."""
    def visit(body: list[ast.stmt], nested: bool):
        previous_was_import = False
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                yield stmt, nested, not previous_was_import
                previous_was_import = True
                continue
            previous_was_import = False
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(stmt, field, None) or []
                inner = nested or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                if field == "handlers":
                    for handler in children:
                        yield from visit(handler.body, inner)
                else:
                    yield from visit(children, inner)
    yield from visit(tree.body, False)


def _targets(node, module: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from . import x
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module
    # `from attune import modeling` imports the module attune.modeling
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layering_violations(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        if imp.target.split(".")[0] in OUTSIDE:
            problems.append(f"{imp}: the library never imports the repository's entry points")
        if _within(imp.target, ENTRY) and not _within(imp.module, ENTRY):
            problems.append(f"{imp}: nothing imports the command line or the demo")
        for who, forbidden, why in RULES:
            if _within(imp.module, who) and _within(imp.target, forbidden):
                problems.append(f"{imp}: {why}")
    return problems


def uncommented_nested_imports(imports: list[Import]) -> list[str]:
    return [f"{imp}: inside a function, with no comment giving the reason (start-up time, code "
            "that runs in a Ray worker, or environment to set before a library loads)"
            for imp in imports if imp.nested and not imp.commented
            and not _within(imp.module, LAZY_BY_DESIGN)]


def private_ray_imports(imports: list[Import]) -> list[str]:
    """Each import of a private Ray module (a part of its name starts with _) or of a private
    name from any Ray module, outside attune.ray_internals."""
    problems = []
    for imp in imports:
        private = [p for p in imp.target.split(".")[1:] + list(imp.names) if p.startswith("_")]
        if _within(imp.target, ("ray",)) and private and imp.module != RAY_INTERNALS:
            problems.append(f"{imp} ({', '.join(private)}): Ray's private names come from "
                            f"{RAY_INTERNALS} alone")
    return problems


def import_cycles(imports: list[Import], package: str = "attune") -> list[str]:
    """Each cycle among the package's modules, as the chain of imports that closes it."""
    edges: dict[str, list[Import]] = {}
    for imp in imports:
        if _within(imp.target, (package,)) and imp.target != imp.module:
            edges.setdefault(imp.module, []).append(imp)
    cycles, done = [], set()

    def visit(module: str, chain: list[Import]):
        for imp in edges.get(module, []):
            path_modules = [c.module for c in chain]
            if imp.target in path_modules:
                loop = chain[path_modules.index(imp.target):] + [imp]
                cycles.append(" -> ".join(str(i) for i in loop))
            elif imp.target not in done:
                visit(imp.target, chain + [imp])
        done.add(module)

    for module in sorted(edges):
        if module not in done:
            visit(module, [])
    return cycles


def test_the_library_keeps_its_layers():
    problems = layering_violations(read_imports(LIBRARY, shown_from=REPO))
    assert not problems, "\n".join(problems)


def test_the_library_has_no_import_cycles():
    cycles = import_cycles(read_imports(LIBRARY, shown_from=REPO))
    assert not cycles, "\n".join(cycles)


def test_imports_inside_functions_say_why():
    problems = uncommented_nested_imports(read_imports(LIBRARY, shown_from=REPO))
    assert not problems, "\n".join(problems)


def test_only_ray_internals_imports_rays_private_names():
    problems = private_ray_imports(read_imports(LIBRARY, shown_from=REPO))
    assert not problems, "\n".join(problems)


@pytest.fixture
def planted(tmp_path):
    """A copy of the library's import structure where one module breaks a rule."""
    def plant(files: dict[str, str]) -> list[Import]:
        for name, text in files.items():
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return read_imports(tmp_path)
    return plant


def test_a_planted_layering_violation_is_named(planted):
    imports = planted({
        "attune/__init__.py": "",
        "attune/train/__init__.py": "",
        "attune/train/trainer.py": "import torch\n",
        "attune/serve/__init__.py": "",
        "attune/serve/app.py": "from attune.train import trainer\n",
        "attune/ui/page.py": "from attune.tune.search import run_search\n",
        "attune/registry.py": "import deployments.tiny\n",
    })
    problems = layering_violations(imports)
    assert sorted(problems) == [
        "attune/registry.py:1: attune.registry imports deployments.tiny: the library never "
        "imports the repository's entry points",
        "attune/serve/app.py:1: attune.serve.app imports attune.train.trainer: serving and the page "
        "never import training or tuning",
        "attune/ui/page.py:1: attune.ui.page imports attune.tune.search: serving and the page "
        "never import training or tuning",
    ]


def test_a_planted_cycle_is_named(planted):
    imports = planted({
        "attune/__init__.py": "",
        "attune/serve/__init__.py": "",
        "attune/serve/app.py": "from attune.serve.direct import direct_app\n",
        "attune/serve/direct.py": "def direct_app():\n    # hidden in a function\n"
                                  "    from attune.serve.app import llm_configs\n",
    })
    (cycle,) = import_cycles(imports)
    assert "attune/serve/app.py:1: attune.serve.app imports attune.serve.direct" in cycle
    assert "attune/serve/direct.py:3: attune.serve.direct imports attune.serve.app" in cycle


def test_a_planted_function_level_import_without_a_reason_is_named(planted):
    imports = planted({
        "attune/__init__.py": "",
        "attune/registry.py": "def plot():\n    import matplotlib\n\n"
                              "def load():\n    # loaded in the Ray worker only\n    import torch\n",
    })
    (problem,) = uncommented_nested_imports(imports)
    assert problem.startswith("attune/registry.py:2: attune.registry imports matplotlib: inside")


def test_a_planted_private_ray_import_is_named(planted):
    imports = planted({
        "attune/__init__.py": "",
        "attune/ray_internals.py": "from ray._private.state import state\n",
        "attune/capacity.py": "import ray\nfrom ray._private.state import state\n",
        "attune/serve/__init__.py": "",
        "attune/serve/auth.py": "from ray.serve.llm import LLMConfig\n"
                                "from ray.serve.context import _get_global_client\n",
        "attune/console.py": "def quiet():\n    # in a function all the same\n"
                             "    import ray.data._internal.logging\n",
    })
    assert sorted(private_ray_imports(imports)) == [
        "attune/capacity.py:2: attune.capacity imports ray._private.state (_private): Ray's "
        "private names come from attune.ray_internals alone",
        "attune/console.py:3: attune.console imports ray.data._internal.logging (_internal): "
        "Ray's private names come from attune.ray_internals alone",
        "attune/serve/auth.py:2: attune.serve.auth imports ray.serve.context (_get_global_client): "
        "Ray's private names come from attune.ray_internals alone",
    ]
