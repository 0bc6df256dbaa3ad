"""A budget the plan keeps (issue 29, item 5): `llm-energy plan` estimates a recorded study within ±20%
of what it measured, from the same FLOP count its windows record and what that study measured; over
plan.budget_minutes it says what would fit and the half-widths that leaves; `llm-energy run` warns
before starting and runs anyway.

The recorded study is tests/unit/fixtures/default_study: the parameters, throughput probe, job wall
times and window, epoch, idle and setup seconds of the default study run on 2026-12-06 on a 2-core AMD
EPYC VM (a fresh clone of 13cef17, with the scorer's attention a few rows at a time and the runner's
imports beside its sustained-load burn, `make study`: 18 min 35 s; 1,102 s from the runner's start to its
end, no window attempt discarded, no job measured again), tables
cut to the columns read here. The calibration leaves the sustained canaries' burn and any job's earlier runs
(`earlier_runs_s` in its done marker) out of the runner's own time."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llm_energy.analysis.halfwidths import Z_95, accuracy_half_width, energy_half_width
from llm_energy.config import PlanSettings, StudyValidationError, load_study, study_from_dict, study_hash
from llm_energy.measure.throughput import PrecisionThroughput
from llm_energy.runner.estimate import calibrate, fit_budget, measured_jobs, packaged_calibration
from llm_energy.runner.plan import budget_lines, budget_warning, plan_from_probe

RECORDED = Path(__file__).resolve().parent / "fixtures" / "default_study"
PARAMS = Path(__file__).resolve().parents[2] / "params"


def _recorded_study():
    raw = yaml.safe_load((RECORDED / "params.resolved.yaml").read_text())
    return study_from_dict(raw, "recorded default study")


def _recorded_probe() -> dict[str, PrecisionThroughput]:
    precisions = json.loads((RECORDED / "provenance.json").read_text())["throughput"]["precisions"]
    return {p: PrecisionThroughput(**r) for p, r in precisions.items()}


@pytest.fixture(scope="module")
def recorded_plan():
    from llm_energy.runner.checks import with_context_exclusions

    study, _ = with_context_exclusions(_recorded_study(), PARAMS)
    return plan_from_probe(study, PARAMS, "cpu", _recorded_probe())


def _measured(key: str, measured: dict[str, float]) -> float:
    """A planned job's measured wall time (a top-k pruning job by its method: the ranking's target),
    less its window attempts discarded as disturbed: the plan estimates a quiet machine, and a window
    measured again comes on top (each discarded attempt taken as long as the kept one, as
    benchmarks/study_profile.py estimates them)."""
    if key.startswith("pruning__<top 1>__"):
        method = key.rsplit("__", 1)[1]
        key = next(k for k in measured if k.startswith("pruning__") and k.endswith(method))
    phase, _, config = key.partition("__")
    repeats = pd.read_csv(RECORDED / "tables" / "energy_repeats.csv")
    mine = repeats[(repeats["phase"] == phase) & (repeats["config_id"] == config)]
    return measured[key] - float((mine["duration_s"] * (mine["attempts"] - 1)).sum())


@pytest.mark.slow  # over 5 s (a real model, a recorded study): make test-fast skips it, make test runs it
def test_the_packaged_calibration_is_the_recorded_studys():
    """The calibration the package ships is what calibrate() reads from the recorded study (so each of
    its numbers traces back to a measurement)."""
    measured, packaged = _flat(calibrate(RECORDED, PARAMS).as_dict()), _flat(packaged_calibration().as_dict())
    assert measured.keys() == packaged.keys()
    for key, value in packaged.items():
        assert measured[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}{i}.").items()}
    return {prefix: value}


@pytest.mark.slow  # over 5 s (a real model, a recorded study): make test-fast skips it, make test runs it
def test_the_plan_estimates_the_recorded_study_within_20_percent(recorded_plan):
    prov = json.loads((RECORDED / "provenance.json").read_text())
    study_s = (pd.Timestamp(prov["finished_at"]) - pd.Timestamp(prov["started_at"])).total_seconds()
    assert study_s == pytest.approx(1102.1, abs=0.1)  # 18 min 22 s (13cef17, AMD EPYC)
    assert recorded_plan.total_s == pytest.approx(study_s, rel=0.20)
    measured = measured_jobs(RECORDED)
    assert len(recorded_plan.jobs) == len(measured)  # the same 20 jobs, the later stages included
    by_phase: dict[str, list[float]] = {}
    for job in recorded_plan.jobs:
        seen = _measured(job.key, measured)
        by_phase.setdefault(job.phase, [0.0, 0.0])
        by_phase[job.phase][0] += job.estimate_s
        by_phase[job.phase][1] += seen
        if job.phase != "pruning":  # top-k pruning's target is the ranking's: only its phase is compared
            assert job.estimate_s == pytest.approx(seen, rel=0.20), job.key
    for phase, (estimate, seen) in by_phase.items():
        assert estimate == pytest.approx(seen, rel=0.25), phase


@pytest.mark.slow  # over 5 s (a real model, a recorded study): make test-fast skips it, make test runs it
def test_the_work_is_counted_from_the_tokenised_data(recorded_plan):
    smollm2 = recorded_plan.work.models["smollm2-135m-instruct"]
    qa, rca = smollm2.tasks["qa"], smollm2.tasks["rca"]
    assert (qa.items, rca.items, smollm2.tasks["rca_resolution"].items) == (200, 120, 8)
    assert len(qa.window_gflop) == 4 and qa.passes == 1  # one pass in 4 chunk windows
    # about 0.2 GFLOP per token at 135M weights: ~16k tokens as they ran (the 5-shot prefix once a window)
    assert 3000 < qa.gflop < 4500 and 3000 < rca.gflop < 4500
    assert smollm2.finetune is not None and smollm2.finetune.examples == 48 and smollm2.finetune.epochs == 2


@pytest.mark.slow  # over 5 s (a real model, a recorded study): make test-fast skips it, make test runs it
def test_over_budget_the_plan_says_what_fits_and_the_half_widths(recorded_plan):
    study = recorded_plan.study.model_copy(update={"plan": PlanSettings(budget_minutes=12)})
    jobs = [(j.phase, j.precision, j.estimate) for j in recorded_plan.jobs]
    options = fit_budget(study, recorded_plan.calibration, jobs, recorded_plan.runner_s, 12 * 60,
                         {"rca": 120, "qa": 200})
    plan = replace(recorded_plan, study=study, options=options)
    assert plan.over_budget
    items = next(o for o in options if o.change.startswith("items "))
    assert items.total_s == pytest.approx(12 * 60)
    n_qa = int(items.change.split("qa 200 -> ")[1].split(",")[0])
    assert 0 < n_qa < 200 and items.accuracy_half_width["qa"] == pytest.approx(Z_95 * math.sqrt(0.25 / n_qa))
    dropped = next(o for o in options if o.change.startswith("precisions without"))
    assert "fp32" not in dropped.change and dropped.total_s < recorded_plan.total_s
    windows = next(o for o in options if o.change.startswith("windows 4 -> 2"))
    spread = recorded_plan.calibration.energy_spread["qa"]
    assert windows.energy_half_width["qa"] == pytest.approx(12.706 * spread / math.sqrt(2))
    assert items.energy_half_width["qa"] == pytest.approx(energy_half_width(spread, 4))
    text = "\n".join(budget_lines(plan))
    assert "OVER plan.budget_minutes (12 min)" in text and f"qa ±{accuracy_half_width(n_qa):.3f}" in text
    assert budget_warning(plan).startswith("warning: study 'default' is ESTIMATED at")
    # the default study itself (~20.0 min estimated, 19.5 measured on this machine): a budget a minute
    # under it is said to be too short, not hidden; a minute over holds it
    tight, roomy = (replace(recorded_plan, study=recorded_plan.study.model_copy(
        update={"plan": PlanSettings(budget_minutes=recorded_plan.total_s / 60 + delta)}), options=[])
        for delta in (-1, 1))
    assert tight.over_budget and budget_warning(tight) is not None
    assert not roomy.over_budget and budget_warning(roomy) is None


def test_budget_minutes_is_validated_by_name(tmp_path):
    params = tmp_path / "study.yaml"
    head = "study: s\nmodels: [{name: tiny-random-llama}]\nprecisions: [fp32]\n"
    params.write_text(head + "plan:\n  budget_minutes: 0\n")
    with pytest.raises(StudyValidationError, match=r"plan\.budget_minutes: Input should be greater than 0"):
        load_study(params)
    params.write_text(head + "plan:\n  budget_minutes: null\n")
    assert load_study(params).plan.budget_minutes is None
    assert load_study(PARAMS / "default.yaml").plan.budget_minutes == 20


def test_a_budget_changes_no_result_so_no_hash():
    study = load_study(PARAMS / "default.yaml")
    assert study_hash(study) == study_hash(study.model_copy(update={"plan": PlanSettings(budget_minutes=5)}))


def test_run_warns_over_budget_and_runs_anyway(capsys, monkeypatch):
    """What `llm-energy run` has run_study do with its probe before the first job (before_jobs): the
    warning on standard error, the estimate kept for provenance.json; an estimate that fails never
    stops the study."""
    from llm_energy.runner import plan as plan_module
    from llm_energy.runner.plan import check_budget

    study = load_study(PARAMS / "smoke.yaml").model_copy(update={"plan": PlanSettings(budget_minutes=0.5)})
    probe = {p: PrecisionThroughput(p, "cpu", 100.0, 1, 0.1, "fake") for p in study.precisions}
    kept = check_budget(study, PARAMS, "cpu", probe)
    assert kept["over_budget"] is True and kept["estimated_s"] > 30 and kept["budget_minutes"] == 0.5
    assert "warning: study 'smoke' is ESTIMATED at" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise RuntimeError("no tokenizer")

    monkeypatch.setattr(plan_module, "plan_from_probe", broken)
    assert check_budget(study, PARAMS, "cpu", probe) == {"error": "RuntimeError: no tokenizer"}


def test_llm_energy_run_checks_the_budget_before_its_jobs(monkeypatch, tmp_path):
    from llm_energy import cli
    from llm_energy.runner import study as runner
    from llm_energy.runner.plan import check_budget

    seen = {}

    def run_study(params, **kwargs):
        seen.update(kwargs)
        return runner.StudyOutcome(out_dir=tmp_path)

    monkeypatch.setattr(runner, "run_study", run_study)
    assert cli.main(["run", str(PARAMS / "smoke.yaml"), "--out", str(tmp_path)]) == 0
    assert seen["before_jobs"] is check_budget


@pytest.mark.slow  # over 5 s (a real model, a recorded study): make test-fast skips it, make test runs it
def test_plan_calibrates_on_a_finished_study_when_asked(monkeypatch, capsys, tmp_path):
    from llm_energy import cli
    from llm_energy.measure import throughput

    monkeypatch.setattr(throughput, "probe_device", lambda precisions, device, **_: {
        p: PrecisionThroughput(p, device, 100.0, 1, 0.1, "fake") for p in ["fp32", *precisions]})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plan", str(PARAMS / "smoke.yaml"), "--calibrate-from", str(RECORDED)]) == 0
    out = capsys.readouterr().out
    assert "as measured in study 'default' finished 2026-12-06 on AMD EPYC, 2 cores" in out
    assert "Estimated total: ~" in out and "plan.budget_minutes (20 min)" in out


@pytest.mark.slow  # over 5 s (a real model, a recorded study): make test-fast skips it, make test runs it
def test_the_runners_own_time_leaves_out_a_job_measured_again_and_the_sustained_burn(recorded_plan, tmp_path):
    """1,102 s of study: 1,064 s of jobs; the 24 s of sustained canaries are not the runner's (the plan
    adds back the burn its study asks for), nor is a job's earlier run when the re-measure stage ran it
    again (shown on a copy of the recorded study with one job run twice, its first run 100 s)."""
    calibration = calibrate(RECORDED, PARAMS)
    jobs_s = sum(measured_jobs(RECORDED).values())
    assert calibration.runner_s == pytest.approx(1102.06 - jobs_s - 24.0, abs=0.1)
    assert 0 < calibration.runner_s < 30  # validation, probe, the warm kernel server's start, the report
    assert recorded_plan.runner_s == pytest.approx(calibration.runner_s + 24.0)
    again = tmp_path / "study"
    shutil.copytree(RECORDED, again)
    marker = again / "state" / "inference__gemma-3-270m__nf4.done"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "earlier_runs_s": [100.0]}))
    prov = json.loads((again / "provenance.json").read_text())
    prov["finished_at"] = (pd.Timestamp(prov["finished_at"]) + pd.Timedelta(seconds=100)).isoformat()
    (again / "provenance.json").write_text(json.dumps(prov))
    assert calibrate(again, PARAMS).runner_s == pytest.approx(calibration.runner_s, abs=0.01)