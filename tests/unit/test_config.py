import textwrap
from pathlib import Path

import pytest

from llm_energy.cli import main
from llm_energy.config import StudyValidationError, load_study, study_hash


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """
study: t
models:
  - name: tiny-random-llama
precisions: [fp32, int8]
"""


def test_minimal_study_fills_defaults(tmp_path):
    study = load_study(write(tmp_path, MINIMAL))
    assert study.precisions == ["fp32", "int8"]
    assert study.energy.country_iso_code == "FRA"
    assert study.tasks.rca.data == "synthetic"
    assert study.ranking.w_grid[3] == 0.3
    assert study.phases == ["data", "inference", "ranking"]


def test_shipped_params_are_valid(root):
    for name in ("default.yaml", "smoke.yaml"):
        load_study(root / "params" / name)


def test_typo_in_key_names_key_and_line(tmp_path):
    path = write(tmp_path, MINIMAL + "energy:\n  idle_secnds: 3\n")
    with pytest.raises(StudyValidationError) as err:
        load_study(path)
    [problem] = err.value.problems
    assert problem.key == "energy.idle_secnds"
    assert problem.line == 7
    assert "unknown key" in problem.message


def test_unknown_precision_is_refused(tmp_path):
    path = write(tmp_path, MINIMAL.replace("int8", "int3"))
    with pytest.raises(StudyValidationError, match=r"precisions\[1\]: got 'int3'"):
        load_study(path)


def test_missing_data_file_is_refused(tmp_path):
    path = write(tmp_path, MINIMAL + "tasks:\n  qa:\n    data: nowhere.jsonl\n")
    with pytest.raises(StudyValidationError, match=r"tasks.qa.data: data file does not exist: "
                                                   r".*nowhere.jsonl"):
        load_study(path)


def test_every_problem_is_listed(tmp_path):
    path = write(tmp_path, """
        study: t
        modles: 1
        models:
          - name: tiny-random-llama
        precisions: [fp64]
        energy:
          country_iso_code: XXX
          idle_seconds: -1
        ranking:
          w: 1.5
          w_grid: [0.0, 2.0]
        tasks:
          rca:
            data: missing.csv
    """)
    with pytest.raises(StudyValidationError) as err:
        load_study(path)
    keys = {p.key for p in err.value.problems}
    assert keys == {"modles", "precisions[0]", "energy.country_iso_code", "energy.idle_seconds", "ranking.w",
                    "ranking.w_grid", "tasks.rca.data"}
    assert all(p.line for p in err.value.problems)


def test_nm_inconsistencies_and_bounds(tmp_path):
    path = write(tmp_path, MINIMAL + "energy:\n  repeats: 4\n  max_repeats: 2\n")
    with pytest.raises(StudyValidationError, match="max_repeats \\(2\\) must be >= repeats \\(4\\)"):
        load_study(path)


def test_unknown_builtin_model(tmp_path):
    path = write(tmp_path, MINIMAL.replace("tiny-random-llama", "gpt-9"))
    with pytest.raises(StudyValidationError, match="unknown builtin model 'gpt-9'"):
        load_study(path)


def test_local_model_folder_must_exist(tmp_path):
    path = write(tmp_path, MINIMAL.replace("- name: tiny-random-llama",
                                           "- name: mine\n    source: local\n    path: no/such/dir"))
    with pytest.raises(StudyValidationError, match="model folder does not exist"):
        load_study(path)


def test_invalid_yaml_reports_line(tmp_path):
    path = write(tmp_path, "study: t\nmodels: [\n")
    with pytest.raises(StudyValidationError, match="not valid YAML"):
        load_study(path)


def test_hash_changes_with_parameters(tmp_path):
    a = load_study(write(tmp_path, MINIMAL, "a.yaml"))
    b = load_study(write(tmp_path, MINIMAL.replace("int8", "nf4"), "b.yaml"))
    assert study_hash(a) != study_hash(b)
    assert study_hash(a) == study_hash(load_study(tmp_path / "a.yaml"))


def test_cli_validate_exit_codes(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, MINIMAL))]) == 0
    bad = write(tmp_path, MINIMAL + "rankng: {}\n", "bad.yaml")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:6: rankng: unknown key" in err


def test_run_refuses_invalid_file_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    bad = write(tmp_path, MINIMAL.replace("int8", "int3"))
    assert main(["run", str(bad), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert "nothing was run" in capsys.readouterr().err
