"""The package's shape: no import cycles between its modules, no top-level `conversion` package."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "replaceme_jax"


def module_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("replaceme_jax"):
                for alias in node.names:  # `from pkg import submodule` depends on the submodule only
                    target = f"{node.module}.{alias.name}"
                    deps.add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
        # A package's __init__ re-exporting its submodules is not a dependency of the submodules on it.
        graph[name] = {d for d in deps if d in modules and d != name and d != "replaceme_jax"}
    return graph


def cycles(graph):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_even_through_function_level_imports():
    graph = module_imports()
    # packages importing their own submodules (models/__init__ -> models.gemma) are not cycles
    for name in graph:
        graph[name] = {d for d in graph[name] if not (name.startswith(d + ".") and d in graph)}
    assert cycles(graph) == []


def test_no_generic_top_level_package_is_installed():
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["replaceme_jax*"]
    assert not (PACKAGE.parent / "conversion" / "__init__.py").exists()


def test_every_registered_family_provides_the_contract_and_a_partial_one_is_refused():
    import types

    from replaceme_jax.models import FAMILIES
    from replaceme_jax.models.base import REQUIRED, check_family

    for family in set(FAMILIES.values()):
        assert all(callable(getattr(family, n)) for n in REQUIRED if n[0].islower()), family.__name__
    partial = types.ModuleType("half_family")
    partial.MODEL_TYPES, partial.forward = ("x",), lambda *a: None
    with pytest.raises(TypeError, match="half_family lacks .*fold_output_map"):
        check_family(partial)
