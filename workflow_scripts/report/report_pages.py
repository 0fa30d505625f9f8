"""The pages `snakemake --report` shows: the comparison, fidelity and data-check Markdown rendered to
self-contained HTML (images inlined, so they show inside the report), and the landing page's summary:
the headline line, one row per arm and the page's caveats (report/workflow.rst includes it).

Snakemake's report views an .html result in a frame; a .md or .csv result is only a download link.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import mimetypes
import re
import sys
from pathlib import Path

import pandas as pd

from workflow_scripts.common.errors import DataError, run_stage

STYLE = """<style>
body { font-family: system-ui, sans-serif; font-size: 14px; line-height: 1.45; margin: 1.2em; color: #111; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 12.5px; }
th, td { border: 1px solid #bbb; padding: 3px 6px; vertical-align: top; }
th { background: #eee; } tr:nth-child(even) td { background: #fafafa; }
blockquote { border-left: 4px solid #c90; margin: 0.4em 0; padding: 0.2em 0.8em; background: #fff8e6; }
img { max-width: 100%; } pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; font-size: 12px; }
</style>"""


def _inline_images(body: str, base: Path) -> str:
    """<img src="relative.png"> -> a data: URI, so the page shows its plots inside the report's frame."""

    def replace(match: re.Match) -> str:
        source = html.unescape(match.group(2))
        # fidelity.md names its plots relative to results/ (it is included in comparison.md there).
        candidates = [Path(source)] if Path(source).is_absolute() else [base / source, base.parent / source]
        path = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
        if source.startswith("data:") or not path.is_file():
            return match.group(0)
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = base64.b64encode(path.read_bytes()).decode()
        return f'{match.group(1)}"data:{mime};base64,{data}"'

    return re.sub(r'(<img[^>]*?\ssrc=)"([^"]+)"', replace, body)


def markdown_page(markdown_file: Path, title: str) -> str:
    """A Markdown file of this workflow as one self-contained HTML page."""
    import markdown  # installed with tensorboard (envs/requirements.txt)

    if not markdown_file.is_file():
        raise DataError(f"{markdown_file} not found: run the stage that writes it first")
    body = markdown.markdown(markdown_file.read_text(), extensions=["tables", "fenced_code"])
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head>\n"
            f"<body>\n{_inline_images(body, markdown_file.parent)}\n</body></html>\n")


def _cell(value: float, digits: int = 3, signed: bool = False) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):{'+' if signed else ''}.{digits}f}"


def summary_fragment(comparison_md: Path, comparison_csv: Path) -> str:
    """The landing page's answer: the headline line, one row per arm (macro AUROC, Δ vs ratio0 and its
    interval, its verdict with the MDE where it reads no measurable difference), the n, and the page's
    caveats, as an HTML fragment that fits the report's side column on one screen. Snakemake's report
    centres that column vertically, so a taller fragment loses its top (the headline) above the page."""
    import markdown

    for path in (comparison_md, comparison_csv):
        if not path.is_file():
            raise DataError(f"{path} not found: run the compare stage first")
    lines = comparison_md.read_text().splitlines()
    headline = next((line for line in lines if line.startswith("**Headline")), "")
    notes = [line[1:].strip() for line in lines if line.startswith(">") and line[1:].strip()]
    table = pd.read_csv(comparison_csv)
    rows = []
    for row in table.to_dict("records"):
        reference = row["arm"] == "ratio0"
        delta = "reference" if reference else (f"{_cell(row['delta_vs_ratio0'], signed=True)}<br><small>"
                                               f"[{_cell(row['delta_vs_ratio0_ci_low'], signed=True)}, "
                                               f"{_cell(row['delta_vs_ratio0_ci_high'], signed=True)}]</small>")
        verdict = "" if reference else html.escape(str(row.get("verdict_vs_ratio0") or ""))
        if verdict == "no measurable difference" and pd.notna(row.get("mde_vs_ratio0")):
            # as comparison.md says it: how large a difference could have hidden
            mde = float(row["mde_vs_ratio0"])
            verdict += "<br><small>" + (f"could have detected ≥ {_cell(mde, signed=True)}" if math.isfinite(mde)
                                        else "could not reliably detect any Δ") + "</small>"
        rows.append(f"<tr><td><b>{html.escape(str(row['arm']))}</b></td><td>{_cell(row['macro_auroc_mean'])}</td>"
                    f"<td>{delta}</td><td>{verdict}</td></tr>")
    parts = ['<div class="cxr-summary"><style>.cxr-summary td, .cxr-summary th {padding: 0.25em 0.4em}</style>']
    if headline:  # its answer and p; the whole table explains the test's rule
        parts.append(markdown.markdown(headline.split(" This line is one test")[0]))
    parts += ['<table style="font-size:0.85em;line-height:1.3"><thead><tr><th>arm</th><th>macro AUROC</th>'
              "<th>Δ vs ratio0 [95% CI]</th><th>verdict</th></tr></thead><tbody>", *rows, "</tbody></table>"]
    if {"seeds", "test_patients"} <= set(table.columns):
        sizes = sorted({(int(seeds), int(patients)) for seeds, patients in zip(table["seeds"], table["test_patients"])})
        parts.append("<p><small>n per arm: " + "; ".join(f"{seeds} training seeds × {patients} test patients"
                                                          for seeds, patients in sizes) + "</small></p>")
    if notes:  # folded, so the answer stays on the first screen; the whole table repeats them
        leads = "; ".join(_lead(note) for note in notes)
        parts.append(f"<details><summary><small><b>Read before citing ({len(notes)}):</b> {leads}</small></summary>"
                     "<p><small>" + "<br>".join(markdown.markdown(note)[3:-4] for note in notes) + "</small></p>"
                     "</details>")
    parts.append("</div>")
    return "\n".join(parts) + "\n"


def _lead(note: str) -> str:
    """A caveat's first words: its bold lead where it has one, else up to its first colon or stop."""
    if note.startswith("**") and "**" in note[2:]:
        return html.escape(note[2:note.index("**", 2)])
    cut = min((note.find(mark) for mark in (":", ". ", " (") if note.find(mark) > 0), default=len(note))
    return html.escape(note[:cut])


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.report.report_pages",
                                     description="Render the comparison, fidelity and data-check pages to HTML for "
                                                 "`snakemake --report`, and the landing page's summary.")
    parser.add_argument("--comparison", type=Path, required=True, help="compare's comparison.md")
    parser.add_argument("--comparison-csv", type=Path, required=True, help="compare's comparison.csv")
    parser.add_argument("--fidelity", type=Path, required=True, help="evaluate_fidelity's fidelity.md")
    parser.add_argument("--verify", type=Path, required=True, help="verify_dataset's verify_report.md")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the .html pages")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pages = {"comparison.html": (args.comparison, "Do synthetic chest X-rays help a classifier?"),
             "fidelity.html": (args.fidelity, "Fidelity, diversity, prompt adherence and memorization"),
             "verify_report.html": (args.verify, "Data check")}
    for name, (source, title) in pages.items():
        (args.out_dir / name).write_text(markdown_page(source, title))
    (args.out_dir / "summary.html").write_text(summary_fragment(args.comparison, args.comparison_csv))
    print(f"report pages in {args.out_dir}: {', '.join([*pages, 'summary.html'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
