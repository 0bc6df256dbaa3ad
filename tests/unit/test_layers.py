"""The library's layers point down: no import cycles, no module importing a layer above its own, no
private name taken from another module, and a runner that imports no phase module.

The layer order is written down here (and in the README's "Where things live"). A new module must be
placed in a layer before this test passes.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "lib" / "llm_energy"
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

# Bottom to top, one folder (or a few top-level modules) per layer: a module's layer is its folder's.
# A module may import modules of its own layer or of layers below it.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation: typed config, names and places, the items a task scores", {"config", "layout", "items"}),
    ("ground: data readers, splits and invalid records", {"data"}),
    ("middle: models at every precision, the energy meter and the device throughput probe, the methods the "
     "phases apply (scoring, generation, pruning, LoRA), and the arithmetic on the tables (ranking, paired "
     "tests)", {"models", "measure", "methods", "analysis"}),
    ("plumbing: the tables and their rows, figures and the HTML report", {"tables", "report"}),
    ("phases: one module per notebook, and the measured evaluation they share", {"phases"}),
    ("runner: jobs, the cluster, the study, its plan, validate's data checks", {"runner"}),
    ("command line", {"cli"}),
]
PHASE_FOLDER = "phases"
RUNNER_FOLDER = "runner"


def folder_of(module: str) -> str:
    """The layer key of a module: its folder, or its own name for a top-level module."""
    return module.split(".")[0]


def layer_of(module: str) -> int:
    for index, (_, keys) in enumerate(LAYERS):
        if folder_of(module) in keys:
            return index
    raise AssertionError(f"llm_energy.{module} is in no layer: add its folder to LAYERS in {__file__}")


def lib_modules() -> list[str]:
    """Every module as a dotted path inside llm_energy (package __init__ files left out)."""
    return sorted(".".join(p.relative_to(LIB).with_suffix("").parts) for p in LIB.rglob("*.py")
                  if p.name != "__init__.py")


def _resolve(module: str, level: int, name: str | None) -> str:
    """The dotted module (inside llm_energy) a relative import names."""
    package = module.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, *([name] if name else [])])


def imports_of(module: str) -> list[tuple[str, list[str], int]]:
    """(imported llm_energy module, names taken from it, line) for every import in the module,
    including those inside functions and under TYPE_CHECKING. `from .pkg import mod` counts as an
    import of pkg.mod."""
    tree = ast.parse((LIB / (module.replace(".", "/") + ".py")).read_text())
    modules = set(lib_modules())
    found = []

    def add(target: str, names: list[str], line: int) -> None:
        submodules = [n for n in names if f"{target}.{n}" in modules] if target not in modules else []
        if submodules:
            found.extend((f"{target}.{n}", [], line) for n in submodules)
            names = [n for n in names if n not in submodules]
            if not names:
                return
        found.append((target, names, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 1:
                target = _resolve(module, node.level, node.module)
            elif node.module and node.module.startswith("llm_energy"):
                target = node.module.partition(".")[2]
            else:
                continue
            add(target, [a.name for a in node.names], node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llm_energy."):
                    found.append((alias.name.partition(".")[2], [], node.lineno))
    return [(t, n, line) for t, n, line in found if t]


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports_of(m) if target != m} for m in lib_modules()}


def test_every_module_has_a_layer():
    for module in lib_modules():
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for module in lib_modules():
        for target, _, line in imports_of(module):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module.replace('.', '/')}.py:{line} imports {target} "
                             f"({LAYERS[layer_of(target)][0].split(':')[0]} is above "
                             f"{LAYERS[layer_of(module)][0].split(':')[0]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_module():
    wrong = [f"{module}.py:{line} imports {name} from {target}"
             for module in lib_modules() for target, names, line in imports_of(module)
             for name in names if name.startswith("_")]
    # module._name through an imported module object
    for module in lib_modules():
        tree = ast.parse((LIB / (module.replace(".", "/") + ".py")).read_text())
        imported = {target.rpartition(".")[2] for target, names, _ in imports_of(module) if not names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in imported
                    and node.attr.startswith("_")):
                wrong.append(f"{module}.py:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_the_runner_imports_no_phase_module():
    wrong = [f"{module}.py:{line} imports {target}" for module in lib_modules()
             if folder_of(module) == RUNNER_FOLDER
             for target, _, line in imports_of(module) if folder_of(target) == PHASE_FOLDER]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("notebook,phase", [("02_finetune", "finetune"), ("03_inference", "inference"),
                                            ("04_pruning", "pruning"), ("05_ranking", "ranking")])
def test_each_phase_notebook_imports_its_module(notebook, phase):
    cells = json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "llm_energy.phases":
            imported |= {a.name for a in node.names}
    assert phase in imported, (f"{notebook} imports {sorted(imported)} from llm_energy.phases, not its phase "
                               f"module {phase}")


def test_the_layer_test_sees_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: a ground-floor module importing a phase is reported."""
    fake = tmp_path / "llm_energy"
    shutil.copytree(LIB, fake, ignore=shutil.ignore_patterns("*.pyc", "__pycache__", "datasets",
                                                             "report_template"))
    (fake / "config.py").write_text("from .phases.inference import load\nfrom .methods.scoring import "
                                    "_encode_item\n")
    monkeypatch.setattr(sys.modules[__name__], "LIB", fake)
    with pytest.raises(AssertionError, match="config.py:1 imports phases.inference"):
        test_no_module_imports_a_layer_above_its_own()
    with pytest.raises(AssertionError, match="config -> phases.inference"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="imports _encode_item from methods.scoring"):
        test_no_private_name_crosses_a_module()
