"""The example studies validate: a hub model (online only), and your own local Hugging Face folder,
here pointed at the tiny random Llama's cached folder."""

import shutil

import yaml

from llm_energy import cli
from llm_energy.config import ModelSettings, TinyLlamaSettings, load_study
from llm_energy.models.loading import ensure_tiny_llama, load_model


def test_hub_example_validates_and_names_a_hub_model(root, capsys):
    path = root / "params" / "examples" / "hub-model.yaml"
    assert cli.main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert [m.source for m in load_study(path).models] == ["hub"]


def test_local_example_asks_for_its_folder_and_nothing_else(root, capsys):
    assert cli.main(["validate", str(root / "params" / "examples" / "local-model.yaml")]) == 2
    problems = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  ")]
    assert len(problems) == 1 and "models[0].path: model folder does not exist" in problems[0]


def test_local_example_runs_on_a_folder_the_user_supplies(root, tmp_path, capsys):
    folder = tmp_path / "models" / "my-model"
    shutil.copytree(ensure_tiny_llama(TinyLlamaSettings()), folder)
    raw = yaml.safe_load((root / "params" / "examples" / "local-model.yaml").read_text())
    raw["models"][0]["path"] = "models/my-model"  # relative to the parameters file, as in the example
    study_file = tmp_path / "local-model.yaml"
    study_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli.main(["validate", str(study_file)]) == 0, capsys.readouterr().err
    model = load_study(study_file).models[0]
    assert model == ModelSettings(name="my-model", source="local", path="models/my-model")
    loaded = load_model(model, "fp32", "cpu", base_dir=tmp_path)
    assert loaded.n_parameters > 0
