"""The shareable report: the executed ranking notebook as one self-contained HTML file (and a PDF).

Nothing of the machine that ran it leaks into what is shared: stderr output (Python warnings, library
log lines) is taken out of the report and kept beside it in ``logs/report-warnings.log``; absolute
paths in text outputs become paths relative to the study folder (or the file's name)."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..tables import store as results

log = logging.getLogger(__name__)

# An absolute POSIX path in text (not a URL): a slash after a non-word, non-slash, non-colon character
# or at the start, then at least two path components.
ABSOLUTE_PATH = re.compile(r"(?<![\w/:.~-])(/(?:[\w.+-]+/)+[\w.+-]*)")
LEAK_WORDS = ("Traceback (most recent call last)", "Warning:", "UserWarning", "FutureWarning",
              "DeprecationWarning", "RuntimeWarning")
WARNINGS_LOG = "report-warnings.log"


def _relative(text: str, study_dir: Path | None) -> str:
    """Absolute paths as the reader of a shared report can use them: under the study folder relative
    to it, anything else by its file name."""
    if study_dir is not None:
        text = text.replace(str(study_dir) + "/", "").replace(str(study_dir), ".")

    def short(match: re.Match[str]) -> str:
        path = match.group(1)
        return Path(path.rstrip("/")).name or path

    return ABSOLUTE_PATH.sub(short, text)


def _clean_text(value: Any, study_dir: Path | None) -> Any:
    if isinstance(value, list):
        return [_relative(v, study_dir) if isinstance(v, str) else v for v in value]
    return _relative(value, study_dir) if isinstance(value, str) else value


def sanitize(notebook: Any, study_dir: Path | None) -> list[str]:
    """Take stderr streams out of the notebook (returned, to be logged) and make every path in its text
    outputs and markdown relative. Images and other binary outputs are left as they are."""
    removed: list[str] = []
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            cell.source = _relative(cell.source, study_dir)
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                removed.append(output.get("text", ""))
                continue
            if output.get("output_type") == "stream":
                output["text"] = _clean_text(output.get("text", ""), study_dir)
            if output.get("output_type") == "error":  # a failed cell: its name and message, no traceback
                removed.append("\n".join(output.get("traceback", [])))
                output["traceback"] = []
            data = output.get("data")
            if data:
                for kind in ("text/plain", "text/markdown", "text/html"):
                    if kind in data:
                        data[kind] = _clean_text(data[kind], study_dir)
            kept.append(output)
        cell["outputs"] = kept
    return removed


def leaks(html: str) -> list[str]:
    """What a shared report must not hold: warning or traceback text, absolute paths (in its text; the
    inline images are skipped)."""
    text = re.sub(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+", "", html)
    text = re.sub(r"<style.*?</style>", "", text, flags=re.S)
    found = [word for word in LEAK_WORDS if word in text]
    found += sorted({m.group(1) for m in ABSOLUTE_PATH.finditer(re.sub(r"<[^>]+>", " ", text))
                     if not m.group(1).startswith(("/>",))})
    return found


def render_html(executed_notebook: str | Path, out_html: str | Path) -> Path:
    """The executed ranking notebook as one self-contained HTML file, code hidden, images inline, no
    warnings, tracebacks or local paths (stderr goes to logs/report-warnings.log beside it)."""
    import nbformat
    from nbconvert import HTMLExporter

    out_html = Path(out_html)
    study_dir = out_html.resolve().parent
    notebook = nbformat.read(str(executed_notebook), as_version=4)
    removed = [text for text in sanitize(notebook, study_dir) if text.strip()]
    exporter = HTMLExporter(
        template_name="offline",  # lab's look, minus every script it would fetch from a CDN
        extra_template_basedirs=[str(Path(__file__).resolve().parents[1] / "report_template")],
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(notebook)
    results.atomic_write_text(out_html, body)
    warnings_log = study_dir / "logs" / WARNINGS_LOG
    if removed:
        warnings_log.parent.mkdir(parents=True, exist_ok=True)
        results.atomic_write_text(warnings_log, "\n".join(removed))
        log.warning("%d stderr output(s) of the ranking notebook left out of the report; kept in %s",
                    len(removed), warnings_log)
    elif warnings_log.exists():
        warnings_log.unlink()
    return out_html


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class PdfUnavailable(RuntimeError):
    """No headless browser to print the report with."""


def render_pdf(html: str | Path, out_pdf: str | Path | None = None, timeout_s: float = 120.0) -> Path:
    """report.html printed to PDF by headless Chromium (offline: the report is self-contained)."""
    html = Path(html).resolve()
    out_pdf = Path(out_pdf) if out_pdf else html.with_suffix(".pdf")
    chromium = find_chromium()
    if chromium is None:
        raise PdfUnavailable("--pdf needs Chromium to print the report, and none is on the PATH (looked for "
                             "chromium, chromium-browser, google-chrome). Install it (Debian/Ubuntu: apt "
                             f"install chromium), or open {html.name} in a browser and print it to PDF "
                             "there.")
    tmp = out_pdf.with_name(out_pdf.name + ".part")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--no-pdf-header-footer",
               f"--print-to-pdf={tmp}", html.as_uri()]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PdfUnavailable(f"Chromium could not print {html.name} (exit {proc.returncode}): "
                             + " | ".join(tail))
    tmp.replace(out_pdf)
    return out_pdf
