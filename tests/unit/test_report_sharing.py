"""What a shared report must not hold (warnings, tracebacks, local paths), readable tables, and --pdf."""

import nbformat
import pandas as pd
import pytest

from llm_energy.phases import ranking as rk
from llm_energy.report import html as report_html


def notebook_with(outputs, markdown="see /home/someone/study/tables/energy.csv"):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(markdown), nbformat.v4.new_code_cell("x", outputs=outputs)]
    return nb


def test_sanitize_takes_stderr_out_and_makes_paths_relative(tmp_path):
    study = tmp_path / "study"
    nb = notebook_with([
        nbformat.v4.new_output("stream", name="stderr",
                               text="/venv/lib/python3.11/site-packages/x.py:3: UserWarning: careful\n"),
        nbformat.v4.new_output("stream", name="stdout", text=f"ranked {study}/tables/ranking.csv\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": f"saved to {study}",
                                                     "text/markdown": "figure in /opt/elsewhere/fig7.png"}),
    ])
    removed = report_html.sanitize(nb, study)
    assert removed and "UserWarning" in removed[0]
    outputs = nb.cells[1].outputs
    assert [o.get("name") for o in outputs if o.output_type == "stream"] == ["stdout"]
    assert outputs[0]["text"] == "ranked tables/ranking.csv\n"
    assert outputs[1]["data"]["text/plain"] == "saved to ."
    assert outputs[1]["data"]["text/markdown"] == "figure in fig7.png"
    assert nb.cells[0].source == "see energy.csv"


def test_leaks_finds_warnings_tracebacks_and_paths_but_not_urls_or_fractions():
    assert report_html.leaks("<p>setup / N and mWh/item, http://example.org/a/b, tables/energy.csv</p>") == []
    found = report_html.leaks("<p>UserWarning: x</p><pre>Traceback (most recent call "
                              "last)</pre><p>/tmp/a/b.py</p>")
    assert "UserWarning" in found and "Traceback (most recent call last)" in found and "/tmp/a/b.py" in found


def test_render_html_keeps_stderr_in_a_log_beside_the_report(tmp_path):
    study = tmp_path / "study"
    (study / "logs").mkdir(parents=True)
    nb = notebook_with([nbformat.v4.new_output("stream", name="stderr", text="RuntimeWarning: noisy\n"),
                        nbformat.v4.new_output("stream", name="stdout", text="fine\n")], markdown="# Title")
    executed = tmp_path / "executed.ipynb"
    nbformat.write(nb, str(executed))
    out = report_html.render_html(executed, study / "report.html")
    html = out.read_text()
    assert "fine" in html and report_html.leaks(html) == []
    assert "RuntimeWarning: noisy" in (study / "logs" / report_html.WARNINGS_LOG).read_text()


def test_pdf_without_chromium_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(report_html, "find_chromium", lambda: None)
    (tmp_path / "report.html").write_text("<html></html>")
    with pytest.raises(report_html.PdfUnavailable, match="apt install chromium"):
        report_html.render_pdf(tmp_path / "report.html")


@pytest.mark.skipif(report_html.find_chromium() is None,
                    reason="no chromium on this machine (.ci/run installs it)")
def test_pdf_is_printed_by_headless_chromium(tmp_path):
    (tmp_path / "report.html").write_text("<html><body><h1>The answer</h1><p>bf16</p></body></html>")
    pdf = report_html.render_pdf(tmp_path / "report.html")
    assert pdf == tmp_path / "report.pdf" and pdf.read_bytes()[:5] == b"%PDF-"
    assert not (tmp_path / "report.pdf.part").exists()


def test_config_ids_read_as_model_precision_adapter_pruning():
    assert rk.pretty_config("smollm2-135m-instruct__fp32__lora__wanda-2of4__recovered") == \
        "smollm2-135m-instruct · fp32 · lora · wanda 2:4 · recovered"
    assert rk.pretty_config("gemma-3-270m__bf16") == "gemma-3-270m · bf16"


def test_tables_show_units_a_person_reads():
    energy = pd.DataFrame({"config_id": ["m__fp32"], "phase": ["inference"], "task": ["qa"], "n_items": [200],
                           "n_tokens": [16000], "energy_kwh": [0.0002], "energy_net_kwh": [0.0001],
                           "energy_kwh_se": [0.00001], "emissions_kg": [0.00001], "duration_s": [20.0],
                           "windows": [4], "contaminated_windows": [0],
                           "energy_method": ["codecarbon:cpu_load"], "estimated_components": ["cpu;ram"]})
    view = rk.energy_view(energy)
    row = view.iloc[0]
    assert row["config"] == "m · fp32"
    assert row["mWh per item"] == pytest.approx(1.0)  # 0.2 Wh over 200 items
    assert row["J per 1k tokens"] == pytest.approx(0.0002 * 3.6e6 * 1000 / 16000)
    html = rk.collapsible(view, "Energy")
    assert html.startswith("<details>") and "<summary><strong>Energy</strong> (1 rows)</summary>" in html
    assert "0.000" not in html  # no six-decimal kWh


def test_report_cli_pdf_flag_writes_the_pdf_or_says_why(tmp_path, monkeypatch, capsys):
    from llm_energy import cli
    from llm_energy.runner import study

    (tmp_path / "report.html").write_text("<html><body>answer</body></html>")
    monkeypatch.setattr(study, "render_report", lambda d: tmp_path / "report.html")
    printed = []
    monkeypatch.setattr(report_html, "render_pdf",
                        lambda html: printed.append(html) or tmp_path / "report.pdf")
    assert cli.main(["report", str(tmp_path), "--pdf"]) == 0 and printed == [tmp_path / "report.html"]
    assert "pdf: " in capsys.readouterr().out

    def unavailable(html):
        raise report_html.PdfUnavailable("--pdf needs Chromium ... apt install chromium")

    monkeypatch.setattr(report_html, "render_pdf", unavailable)
    assert cli.main(["report", str(tmp_path), "--pdf"]) == 2
    assert "apt install chromium" in capsys.readouterr().err
