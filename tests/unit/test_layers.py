"""The library's layers point down: no import cycles, no module importing a layer above its own, no
private name taken from another module, and a runner that imports no phase module.

The layer order is written down here (and in the README's "Where things live"). A new module must be
placed in a layer before this test passes.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "lib" / "llm_energy"
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

# Bottom to top. A module may import modules of its own layer or of layers below it.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation: typed config, names and places, the items a task scores", {"config", "layout", "items"}),
    ("ground: data readers, table writers, the energy meter, the device throughput probe, the W8A8 layer",
     {"teleqna", "data", "results", "energy", "throughput", "quant8"}),
    ("middle: models, scoring, generation, pruning, sparse kernels, LoRA, paired tests, ranking arithmetic",
     {"models", "scoring", "generation", "prune", "sparse", "lora", "significance", "rank"}),
    ("shared plumbing of the phases: table rows, the measured evaluation, figures, the HTML report, "
     "the data checks of validate", {"records", "evaluation", "plots", "report", "checks"}),
    # (the data phase's module is `data` itself: notebook 01 reads and summarises the splits)
    ("phases: one module per notebook", {"finetune", "inference", "pruning", "ranking"}),
    ("runner: jobs, the cluster, the study, its plan", {"jobs", "scale", "study", "plan"}),
    ("command line", {"cli"}),
]
PHASE_MODULES = {"finetune", "inference", "pruning", "ranking", "evaluation"}
RUNNER_MODULES = {"jobs", "scale", "study", "plan"}


def layer_of(module: str) -> int:
    for index, (_, modules) in enumerate(LAYERS):
        if module in modules:
            return index
    raise AssertionError(f"llm_energy.{module} is in no layer: add it to LAYERS in {__file__}")


def lib_modules() -> list[str]:
    return sorted(p.stem for p in LIB.glob("*.py") if p.stem != "__init__")


def imports_of(module: str) -> list[tuple[str, list[str], int]]:
    """(imported llm_energy module, names taken from it, line) for every import in the module,
    including those inside functions and under TYPE_CHECKING."""
    tree = ast.parse((LIB / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import a, b
                found.append((node.module.split(".")[0], [a.name for a in node.names], node.lineno))
            elif node.level == 1:  # from . import x, y
                found += [(a.name, [], node.lineno) for a in node.names]
            elif node.module and node.module.startswith("llm_energy"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.append((parts[1], [a.name for a in node.names], node.lineno))
                else:
                    found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llm_energy."):
                    found.append((alias.name.split(".")[1], [], node.lineno))
    return found


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
                wrong.append(f"{module}.py:{line} imports {target} "
                             f"({LAYERS[layer_of(target)][0].split(':')[0]} is above {LAYERS[layer_of(module)][0].split(':')[0]})")
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
        tree = ast.parse((LIB / f"{module}.py").read_text())
        imported = {target for target, names, _ in imports_of(module) if not names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                    and node.attr.startswith("_")):
                wrong.append(f"{module}.py:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_the_runner_imports_no_phase_module():
    wrong = [f"{module}.py:{line} imports {target}" for module in sorted(RUNNER_MODULES)
             for target, _, line in imports_of(module) if target in PHASE_MODULES]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("notebook,phase", [("02_finetune", "finetune"), ("03_inference", "inference"),
                                            ("04_pruning", "pruning"), ("05_ranking", "ranking")])
def test_each_phase_notebook_imports_its_module(notebook, phase):
    cells = json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "llm_energy":
            imported |= {a.name for a in node.names}
    assert phase in imported, f"{notebook} imports {sorted(imported)} from llm_energy, not its phase module {phase}"


def test_the_layer_test_sees_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: a ground-floor module importing a phase is reported."""
    fake = tmp_path / "llm_energy"
    fake.mkdir()
    for module in lib_modules():
        (fake / f"{module}.py").write_text((LIB / f"{module}.py").read_text())
    (fake / "config.py").write_text("from .inference import load\nfrom .scoring import _encode_item\n")
    monkeypatch.setattr(sys.modules[__name__], "LIB", fake)
    with pytest.raises(AssertionError, match="config.py:1 imports inference"):
        test_no_module_imports_a_layer_above_its_own()
    with pytest.raises(AssertionError, match="config -> inference"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="imports _encode_item from scoring"):
        test_no_private_name_crosses_a_module()
