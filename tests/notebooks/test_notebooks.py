"""Each phase notebook run alone by papermill, in a fresh output folder of its own, with tiny
parameters; results read back with tolerances. No test reads another's leftovers: the ranking notebook
builds the study it ranks."""


import papermill
import pytest

from llm_energy.tables import store as results

pytestmark = pytest.mark.slow


@pytest.fixture
def study_dir(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    return folder


def execute(root, name, out_dir, **parameters):
    output = out_dir / "executed" / name
    output.parent.mkdir(exist_ok=True)
    papermill.execute_notebook(str(root / "notebooks" / name), str(output), parameters=parameters,
                               kernel_name="python3", progress_bar=False, cwd=str(root / "notebooks"))
    return output


def test_data_notebook_writes_token_lengths_and_figure1(root, study_dir):
    execute(root, "01_data.ipynb", study_dir, study_dir=str(study_dir))
    lengths = results.read_table(study_dir, "token_lengths")
    assert set(lengths["task"]) == {"rca", "qa"}
    assert {"train", "validation", "test"} <= set(lengths["split"])
    assert (lengths["n_tokens"] > 5).all()
    assert (study_dir / "figures" / "fig1_token_lengths.png").stat().st_size > 10_000


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_inference_notebook_records_energy_and_scores(root, study_dir, precision):
    execute(root, "03_inference.ipynb", study_dir, study_dir=str(study_dir), precision=precision,
            tasks={"rca": {"max_items": 4}, "qa": {"max_items": 5}},
            energy={"idle_seconds": 0.5, "repeats": 2, "max_repeats": 2})
    config_id = f"tiny-random-llama__{precision}"
    energy = results.read_table(study_dir, "energy")
    rows = energy[energy["config_id"] == config_id].set_index("task")
    assert set(rows.index) == {"rca", "qa"}
    assert rows.loc["rca", "n_items"] == 4 and rows.loc["qa", "n_items"] == 5
    assert (rows["repeats"] == 2).all()
    assert (rows["energy_kwh"] > 0).all() and (rows["duration_s"] > 0).all()
    assert rows["energy_method"].str.len().gt(0).all()
    # net = gross - loaded-idle power x duration, the loaded idle this job measured in its own process
    idles = results.read_table(study_dir, "idle_baselines").set_index(["config_id", "phase", "kind"])
    idle = idles.loc[(config_id, "inference", "loaded"), "power_w"]
    assert (config_id, "inference", "system") in idles.index
    assert rows["idle_loaded_power_w"].to_numpy() == pytest.approx([idle] * len(rows))
    assert rows["idle_system_power_w"].notna().all()
    expected_net = rows["energy_kwh"] - idle * rows["duration_s"] / 3.6e6
    assert rows["energy_net_kwh"].to_numpy() == pytest.approx(expected_net.to_numpy(), rel=1e-6, abs=1e-12)
    scores = results.read_table(study_dir, "scores")
    mine = scores[scores["config_id"] == config_id]
    assert (set(zip(mine["task"], mine["metric"]))
            == {("rca", "accuracy"), ("rca", "macro_f1"), ("qa", "acc"), ("qa", "acc_norm")})
    assert mine["value"].between(0, 1).all()
    assert (mine["ci_low"] <= mine["value"] + 1e-9).all() and (mine["value"] <= mine["ci_high"] + 1e-9).all()


def test_ranking_notebook_run_alone_ranks_a_study_it_builds_and_renders(root, study_dir):
    # study_dir empty: the notebook builds its example study (here into example_dir) and ranks it
    executed = execute(root, "05_ranking.ipynb", study_dir, study_dir="", example_dir=str(study_dir),
                       ranking={"w": 0.5, "bootstrap": 20})
    ranking = results.read_table(study_dir, "ranking")
    assert set(ranking["config_id"]) == {"tiny-random-llama__fp32", "tiny-random-llama__bf16"}
    assert len(ranking) == 2 * 11
    assert (
        ranking["R"] - (ranking["w"] * ranking["phi"]
                        + (1 - ranking["w"]) * ranking["rho"])).abs().max() < 1e-12
    for name in ("fig4_inference_energy_carbon", "fig5_quantization_impact", "fig7_ranking",
                 "fig8_lifecycle"):
        assert ((study_dir / "figures" / f"{name}.png").exists()
                and (study_dir / "figures" / f"{name}.pdf").exists())
    lifecycle = results.read_table(study_dir, "lifecycle")
    totals = lifecycle[lifecycle["step"] == "total"].set_index("config_id")
    assert totals.loc["tiny-random-llama__fp32", "break_even_queries"] == "reference"
    assert totals.loc["tiny-random-llama__bf16", "break_even_queries"] in ("immediately", "never")  # no setup
    from llm_energy.report.html import render_html

    html = render_html(executed, study_dir / "report.html").read_text()
    assert "Top configurations at w = 0.5" in html and "No study_dir given" in html
    assert "ESTIMATED" in html or "measured by hardware counters" in html
    assert html.count("data:image/png;base64") >= 5


@pytest.mark.parametrize("name", ["02_finetune.ipynb", "04_pruning.ipynb"])
def test_the_other_phase_notebooks_run_alone_in_a_fresh_folder(root, study_dir, name):
    execute(root, name, study_dir, study_dir=str(study_dir))
    energy = results.read_table(study_dir, "energy")
    assert len(energy) and (energy["energy_kwh"] > 0).all()
    if name == "04_pruning.ipynb":
        setup = results.read_table(study_dir, "setup_energy")
        assert {"load", "calibration", "prune"} <= set(setup["step"])
