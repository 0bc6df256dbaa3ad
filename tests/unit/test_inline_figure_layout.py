"""The notebooks' inline figures (one config in 03, one training run in 02, one pruned model's layers in
04) under the same layout checks as the report's figures (report/layout_check.py)."""

import warnings
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from figure_tables import smoke_tables  # noqa: E402

from llm_energy.report import figures  # noqa: E402
from llm_energy.report.layout_check import layout_problems  # noqa: E402


def check(build, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = build()
        problems = layout_problems(fig, name)
    plt.close(fig)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("config_id", ["tiny-random-llama__fp32", "tiny-random-llama__nf4__lora"])
def test_one_configs_figure_reads(config_id):
    tables = smoke_tables()
    check(lambda: figures.config_figure(tables["energy"], tables["scores"], config_id),
          f"config_figure {config_id}")


@pytest.mark.parametrize("epochs", [2, 12])
def test_one_training_runs_figure_reads(epochs):
    records = [SimpleNamespace(epoch=e + 1, train_loss=3.0 / (e + 1), eval_loss=3.2 / (e + 1),
                               energy_kwh=1e-4 * (e + 1), energy_method="codecarbon:cpu_load")
               for e in range(epochs)]
    check(lambda: figures.epochs_figure(records, "smollm2-135m-instruct__fp32__lora"),
          f"epochs_figure {epochs}")


@pytest.mark.parametrize("n_layers", [4, 30])
def test_one_pruned_models_layers_figure_reads(n_layers):
    layers = [SimpleNamespace(name=f"model.layers.{i}.mlp.{part}", measured_sparsity=0.5)
              for i in range(n_layers) for part in ("gate_proj", "up_proj", "down_proj")]
    check(lambda: figures.layers_figure(layers, 0.5, "smollm2-135m-instruct__w8a8__wanda-2of4"),
          f"layers_figure {n_layers}")
