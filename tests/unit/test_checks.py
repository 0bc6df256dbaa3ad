"""`llm-energy validate` reads the data: bad records, empty or shared splits, prompts over a model's
context."""

import json
import subprocess
import sys

from llm_energy.config import study_from_dict
from llm_energy.runner.checks import data_problems

TINY = [{"name": "tiny-random-llama"}]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def tickets(n, split=None, long_ticket=None):
    out = []
    for i in range(n):
        record = {"id": f"t{i}", "ticket": f"alarm {i} on ring",
                  "root_cause": ("fibre_cut", "power_failure")[i % 2]}
        if split:
            record["split"] = split(i)
        out.append(record)
    if long_ticket is not None:
        out[0]["ticket"] = long_ticket
    return out


def study(tmp_path, rca: dict, **extra):
    return study_from_dict({"study": "s", "models": TINY, "precisions": ["fp32"],
                            "tasks": {"rca": rca, "qa": None}, **extra})


def test_every_malformed_record_is_listed_with_line_and_field(tmp_path):
    records = tickets(10)
    records[2]["ticket"] = ""
    records[5]["root_cause"] = None
    records[7] = {"id": "t1", "ticket": "dup", "root_cause": "fibre_cut"}
    path = write_jsonl(tmp_path / "rca.jsonl", records)
    problems = data_problems(study(tmp_path, {"data": str(path)}), tmp_path)
    found = [(p.file, p.line, p.key) for p in problems]
    assert found == [(str(path), 3, "tasks.rca (ticket)"), (str(path), 6, "tasks.rca (root_cause)"),
                     (str(path), 8, "tasks.rca (id)")]
    assert "is empty" in problems[0].message and "invalid_records: skip" in problems[0].message
    # with skip they are left out, and the study is valid
    assert data_problems(study(tmp_path, {"data": str(path), "invalid_records": "skip"}), tmp_path) == []


def test_training_on_the_scored_split_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "rca.jsonl", tickets(40))
    finetune = {"phases": ["data", "finetune", "inference", "ranking"],
                "finetune": {"task": "rca", "precisions": ["fp32"]}}
    assert data_problems(study(tmp_path, {"data": str(path)}, **finetune), tmp_path) == []
    problems = data_problems(study(tmp_path, {"data": str(path), "split": "train"}, **finetune), tmp_path)
    assert len(problems) == 1 and problems[0].key == "tasks.rca (split)"
    assert "the scored split 'train' is the one fine-tuning trains on" in problems[0].message
    wanda = {"phases": ["data", "inference", "pruning", "ranking"],
             "pruning": {"targets": ["tiny-random-llama__fp32"],
                         "methods": [{"method": "wanda", "pattern": "2:4"}]}}
    problems = data_problems(study(tmp_path, {"data": str(path), "split": "train"}, **wanda), tmp_path)
    assert ([p.message.split(":")[0] for p in problems]
            == ["the scored split 'train' is the one Wanda calibrates on"])


def test_an_empty_split_that_the_study_needs(tmp_path):
    path = write_jsonl(tmp_path / "rca.jsonl", tickets(20, split=lambda i: "train" if i % 2 else "test"))
    finetune = {"phases": ["data", "finetune", "inference", "ranking"],
                "finetune": {"task": "rca", "precisions": ["fp32"]}}
    problems = data_problems(study(tmp_path, {"data": str(path)}, **finetune), tmp_path)
    assert [p.message for p in problems] == [
        "split 'validation' is empty, but fine-tuning validates on it (check the file's split field or "
        "split_fractions)"]


def test_a_prompt_longer_than_the_models_context(tmp_path):
    path = write_jsonl(tmp_path / "rca.jsonl", tickets(4, long_ticket="fibre alarm " * 1500))
    problems = data_problems(study(tmp_path, {"data": str(path), "split_fractions": [0, 0]}), tmp_path)
    assert len(problems) == 1 and problems[0].key == "tasks.rca (item t0)"
    assert "over tiny-random-llama's context of 2048" in problems[0].message


def test_validate_command_reads_the_data(tmp_path, root):
    records = tickets(10)
    records[3]["ticket"] = "  "
    path = write_jsonl(tmp_path / "rca.jsonl", records)
    params = tmp_path / "study.yaml"
    params.write_text(f"study: s\nmodels: [{{name: tiny-random-llama}}]\nprecisions: [fp32]\n"
                      f"tasks: {{rca: {{data: {path}}}, qa: null}}\n")
    proc = subprocess.run([sys.executable, "-m", "llm_energy.cli", "validate", str(params)],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 2
    assert f"{path}:4: tasks.rca (ticket): is empty" in proc.stderr


def test_records_too_long_are_left_out_before_sampling_under_skip(tmp_path):
    from llm_energy.data.tasks import load_all_splits, skipped_rows
    from llm_energy.runner.checks import with_context_exclusions

    path = write_jsonl(tmp_path / "rca.jsonl", tickets(12, long_ticket="fibre alarm " * 1500))
    s = study(tmp_path, {"data": str(path), "invalid_records": "skip", "split_fractions": [0, 0]})
    excluded, counts = with_context_exclusions(s, tmp_path)
    assert counts == {"rca": 1}
    assert list(excluded.tasks.rca.exclude_records) == ["t0"]
    assert "over tiny-random-llama's context of 2048" in excluded.tasks.rca.exclude_records["t0"]
    assert data_problems(excluded, tmp_path) == []
    settings = excluded.tasks.rca
    assert "t0" not in {i.id for data in load_all_splits("rca", settings).values() for i in data.items}
    rows = skipped_rows("rca", settings)
    assert [(r["line"], r["record"], r["field"]) for r in rows] == [(1, "t0", "prompt")]
    # under error the same study is refused, naming the item
    problems = data_problems(study(tmp_path, {"data": str(path), "split_fractions": [0, 0]}), tmp_path)
    assert [p.key for p in problems] == ["tasks.rca (item t0)"]
