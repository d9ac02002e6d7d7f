"""The package's imports run one way: each subpackage imports only from the layers below it (or
its own), no module imports another's private names, and there is no import cycle anywhere.

The order (STYLE.md rule 4): config <- ops (with solo_fast.kernels) <- models, targets, data <-
losses <- postprocess <- builder <- engine <- the applications (convert, demo, bench, cli and the
package's own ``__init__``). Every import counts, function-local and ``TYPE_CHECKING`` ones too:
a local import is no way around the order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# module-name prefix -> layer; the longest matching prefix wins
LAYERS = {
    "solo_fast.config": 0, "solo_fast.deploy": 0,
    "solo_fast.ops": 1, "solo_fast.kernels": 1,
    "solo_fast.models": 2, "solo_fast.targets": 2, "solo_fast.data": 2,
    "solo_fast.losses": 3,
    "solo_fast.postprocess": 4,
    "solo_fast.builder": 5, "solo_fast.export": 5,
    "solo_fast.engine": 6,
    "solo_fast": 7,  # convert, demo, bench, cli, __init__
}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Module name -> file, for the package and its Triton kernels (installed as
    solo_fast.kernels from the top-level kernels/ folder)."""
    found = {}
    for folder, package in ((ROOT / "solo_fast", "solo_fast"), (ROOT / "kernels",
                                                                  "solo_fast.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of every import of a file that names one of
    the package's modules."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                # "from a import b" imports module a.b where b is one, else a name of a
                target = f"{base}.{alias.name}"
                if target in MODULES:
                    found.append((target, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return [(target, names, line) for target, names, line in found if target in MODULES]


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_the_package_was_found():
    assert {"solo_fast.ops", "solo_fast.postprocess.fused", "solo_fast.kernels.dice_loss",
            "solo_fast.models.solov2", "solo_fast.cli"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_from_its_layer_or_below(module):
    wrong = [f"line {line}: {target} (layer {_layer(target)})"
             for target, _, line in GRAPH[module] if _layer(target) > _layer(module)]
    assert not wrong, f"{module} (layer {_layer(module)}) imports upwards: {wrong}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_takes_no_private_name_of_another_module(module):
    private = [f"line {line}: {name} from {target}" for target, names, line in GRAPH[module]
               for name in names if _private(name) and target != module]
    assert not private, f"{module} imports private names: {private}"


def test_no_import_cycle():
    """Tarjan's strongly connected components of the module graph: every one must be a single
    module. A package's ``__init__`` importing its own submodules is an edge like any other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in GRAPH[node]:
            if target == node:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_and_an_upward_import_are_caught(tmp_path, monkeypatch):
    """The checks above on a planted graph: they can fail."""
    planted = {"solo_fast.ops.a": [("solo_fast.postprocess.b", [], 1)],
               "solo_fast.postprocess.b": [("solo_fast.ops.a", ["_private"], 1)]}
    monkeypatch.setattr(f"{__name__}.GRAPH", planted)
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="imports upwards"):
        test_imports_only_from_its_layer_or_below("solo_fast.ops.a")
    with pytest.raises(AssertionError, match="imports private names"):
        test_takes_no_private_name_of_another_module("solo_fast.postprocess.b")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("solo_fast.")
                                          and not m.startswith("solo_fast.kernels")))
def test_no_file_over_the_size_limit(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines (at most {MAX_LINES})"
