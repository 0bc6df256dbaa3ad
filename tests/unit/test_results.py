import pytest

from llm_energy.tables import store as results


def score_row(config_id, metric, value):
    return {"config_id": config_id, "task": "qa", "metric": metric, "value": value, "ci_low": 0, "ci_high": 1,
            "n_items": 10}


def test_upsert_replaces_same_key_and_keeps_others(tmp_path):
    results.upsert_rows(tmp_path, "scores", [score_row("a", "acc", 0.1), score_row("b", "acc", 0.2)])
    results.upsert_rows(tmp_path, "scores", [score_row("a", "acc", 0.9)])
    table = results.read_table(tmp_path, "scores")
    assert len(table) == 2
    assert table.set_index("config_id").loc["a", "value"] == 0.9
    assert table.set_index("config_id").loc["b", "value"] == 0.2
    assert list(table.columns[:7]) == results.SCORES_COLUMNS


def test_replace_where_drops_stale_rows(tmp_path):
    results.upsert_rows(tmp_path, "scores", [score_row("a", "acc", 0.1), score_row("a", "old_metric", 0.5)])
    results.upsert_rows(tmp_path, "scores", [score_row("a", "acc", 0.3)], replace_where={"config_id": "a"})
    assert results.read_table(tmp_path, "scores")["metric"].tolist() == ["acc"]


def test_missing_required_column_is_refused_and_table_untouched(tmp_path):
    results.upsert_rows(tmp_path, "scores", [score_row("a", "acc", 0.1)])
    before = results.table_path(tmp_path, "scores").read_text()
    with pytest.raises(ValueError, match=r"lack required columns \['ci_low'"):
        results.upsert_rows(tmp_path, "scores",
                            [{"config_id": "b", "task": "qa", "metric": "acc", "value": 1}])
    assert results.table_path(tmp_path, "scores").read_text() == before


def test_no_temporary_files_left(tmp_path):
    results.upsert_rows(tmp_path, "scores", [score_row("a", "acc", 0.1)])
    leftovers = [p.name for p in results.tables_dir(tmp_path).iterdir() if p.suffix == ".tmp"]
    assert leftovers == []


def test_read_missing_table_gives_columns(tmp_path):
    frame = results.read_table(tmp_path, "energy")
    assert frame.empty and list(frame.columns) == results.ENERGY_COLUMNS


def test_config_ids_stay_text(tmp_path):
    results.upsert_rows(tmp_path, "scores", [score_row("001", "acc", 0.1)])
    assert results.read_table(tmp_path, "scores")["config_id"].tolist() == ["001"]
