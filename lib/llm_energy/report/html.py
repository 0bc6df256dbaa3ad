"""The shareable report: the executed ranking notebook as one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path

from ..tables import store as results


def render_html(executed_notebook: str | Path, out_html: str | Path) -> Path:
    """The executed ranking notebook as one self-contained HTML file, code hidden, images inline."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(str(executed_notebook), as_version=4)
    exporter = HTMLExporter(
        template_name="offline",  # lab's look, minus every script it would fetch from a CDN
        extra_template_basedirs=[str(Path(__file__).resolve().parents[1] / "report_template")],
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(notebook)
    out_html = Path(out_html)
    results.atomic_write_text(out_html, body)
    return out_html
