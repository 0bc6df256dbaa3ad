"""The notebooks are the source, each paired with a py:percent script by Jupytext: the two sides
must hold the same cells (type, source, tags), and the .ipynb files carry no outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
PHASES = ["01_data", "02_finetune", "03_inference", "04_pruning", "05_ranking"]


def cells_of(path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """What a reader and papermill see of each cell: its type, its source, its tags."""
    notebook = jupytext.read(path)
    return [(cell.cell_type, cell.source.strip(), tuple(sorted(cell.metadata.get("tags", []))))
            for cell in notebook.cells]


def disagreements(ipynb: Path, script: Path) -> list[str]:
    left, right = cells_of(ipynb), cells_of(script)
    problems = []
    if len(left) != len(right):
        problems.append(f"{ipynb.name} has {len(left)} cells, {script.name} has {len(right)}")
    for index, (a, b) in enumerate(zip(left, right)):
        if a != b:
            what = "type" if a[0] != b[0] else ("tags" if a[2] != b[2] else "source")
            problems.append(f"cell {index}: different {what} ({ipynb.name}: {a[1][:60]!r} | {script.name}: "
                            f"{b[1][:60]!r})")
    return problems


def test_every_phase_notebook_has_its_script():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == PHASES
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == PHASES


@pytest.mark.parametrize("name", PHASES)
def test_pair_is_declared_and_agrees(name):
    ipynb, script = NOTEBOOKS / f"{name}.ipynb", NOTEBOOKS / f"{name}.py"
    for path in (ipynb, script):
        formats = jupytext.read(path).metadata.get("jupytext", {}).get("formats", "")
        assert (set(formats.split(","))
                == {"ipynb", "py:percent"}), f"{path.name}: jupytext formats {formats!r}"
    problems = disagreements(ipynb, script)
    assert not problems, (f"{name}: the notebook and its script disagree; run "
                          f"`jupytext --sync notebooks/{name}.ipynb` (the newer side wins):\n"
                          + "\n".join(problems))


@pytest.mark.parametrize("name", PHASES)
def test_notebook_is_committed_without_outputs_and_has_one_parameters_cell(name):
    raw = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    code = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None
               for c in code), f"{name}.ipynb carries outputs"
    for path in (NOTEBOOKS / f"{name}.ipynb", NOTEBOOKS / f"{name}.py"):
        tagged = [c for c in jupytext.read(path).cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged parameters"


def test_an_edit_on_one_side_is_caught(tmp_path):
    """The comparison can fail: a changed line in the script, or a lost tag, is reported."""
    ipynb = tmp_path / "03_inference.ipynb"
    ipynb.write_text((NOTEBOOKS / "03_inference.ipynb").read_text())
    script = tmp_path / "03_inference.py"
    text = (NOTEBOOKS / "03_inference.py").read_text()
    script.write_text(text.replace('precision: str = "fp32"', 'precision: str = "bf16"', 1))
    assert any("different source" in p for p in disagreements(ipynb, script))
    script.write_text(text.replace('# %% tags=["parameters"]', "# %%", 1))
    assert any("different tags" in p for p in disagreements(ipynb, script))
