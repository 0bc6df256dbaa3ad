"""params/paper.yaml: the full factorial of the paper is a valid study and expands to every config."""

from __future__ import annotations

from llm_energy.config import PRECISIONS, PRUNING_METHODS, load_study
from llm_energy.runner import study as runner


def test_the_paper_study_is_the_full_factorial(root, tmp_path):
    study = load_study(root / "params" / "paper.yaml")
    assert [m.name for m in study.models] == ["smollm2-135m-instruct", "gemma-3-270m"]
    assert tuple(study.precisions) == PRECISIONS
    assert study.finetune is not None and study.finetune.precisions == ["fp32", "bf16", "int8", "nf4"]
    assert study.tasks.qa.max_items == 1000 and study.tasks.rca.max_items is None
    assert study.pruning is not None and study.pruning.recover is not None
    assert {(m.method, m.pattern) for m in study.pruning.methods} == {
        (method, pattern) for method in PRUNING_METHODS for pattern in ("unstructured", "2:4", "4:8")}
    assert study.ranking.metrics is None and study.device_limits.max_slowdown == 8.0

    jobs, skipped = runner.expand(study, tmp_path, root / "params", "cpu")
    by_phase = {phase: [j for j in jobs if j.phase == phase]
                for phase in ("finetune", "inference", "pruning")}
    assert len(by_phase["finetune"]) + len([s for s in skipped if s["config_id"].endswith("__lora")]) == 2 * 4
    assert len(by_phase["inference"]) + len([s for s in skipped if s["config_id"].count("__") == 1]) == 2 * 7
    assert len(by_phase["pruning"]) == 6 * 6  # six targets x six method-patterns
