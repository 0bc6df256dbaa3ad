import re
import tomllib

import yaml


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_packages(root):
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = {_name(d) for d in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert {_name(d) for d in pip_section} == wanted


def test_notebooks_have_one_parameters_cell_and_no_outputs(root):
    import nbformat

    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, path.name
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


def test_makefile_pins_torch_and_ci_runs_make_test(root):
    makefile = (root / "Makefile").read_text()
    assert "TORCH ?= torch==2.13.0" in makefile
    assert "make test" in (root / ".ci" / "run").read_text()
