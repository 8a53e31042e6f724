"""A :class:`~evals.tables.Table` as Markdown, LaTeX or HTML.

Each cell shows its value and its change against the fp merged model; published rows follow the
rows they belong to.
"""

from __future__ import annotations

import html

from evals.tables import SECOND_REFERENCES, Row, Table


def _digits(table: Table, column: int) -> int:
    return 2 if table.columns[column].startswith(("Time", "Ratio")) else 1


def _cells(table: Table, row: Row) -> list[tuple[str, str]]:
    cells = []
    for i, value in enumerate(row.cells):
        if value is None:
            cells.append(("", ""))
            continue
        digits = _digits(table, i)
        delta = row.deltas[i] if i < len(row.deltas) else None
        cells.append((f"{value:.{digits}f}", "" if delta is None else f"{delta:+.{digits}f}"))
    return cells


def _paper_cells(table: Table, row: Row) -> list[str] | None:
    if not any(value is not None for value in row.paper):
        return None
    return ["" if value is None else f"{value:.{_digits(table, i)}f}" for i, value in enumerate(row.paper)]


def _reference_lines(table: Table, row: Row) -> list[tuple[str, list[str]]]:
    """The published rows printed under ``row``: ``("paper", cells)``, then each second reference."""
    lines = [("paper", cells)] if (cells := _paper_cells(table, row)) is not None else []
    for name, values in row.others.items():
        lines.append((name, ["" if value is None else f"{value:.{_digits(table, i)}f}" for i, value in enumerate(values)]))
    return lines


def _has_paper(table: Table) -> bool:
    return any(_paper_cells(table, row) for row in table.rows)


def _second_references(table: Table) -> list[str]:
    return sorted({name for row in table.rows for name in row.others})


def to_markdown(table: Table) -> str:
    lines = [f"**{table.caption}**", "", "| Method | " + " | ".join(table.columns) + " | ± |",
             "|---|" + "---:|" * (len(table.columns) + 1)]
    for row in table.rows:
        texts = [f"{v} ({d})" if d else v for v, d in _cells(table, row)]
        label = f"**{row.label}**" if row.section else row.label
        stderr = f"{row.stderr:.1f}" if row.stderr is not None else ""
        lines.append(f"| {label} | " + " | ".join(texts) + f" | {stderr} |")
        for name, published in _reference_lines(table, row):
            lines.append(f"| _{name}_ | " + " | ".join(f"_{p}_" if p else "" for p in published) + " | |")
    lines += [""] + [f"_{note}_" for note in table.notes]
    lines.append("_Parenthesised: change against the fp merged model. ±: standard error of the last column._")
    if _has_paper(table):
        lines.append("_paper: the published numbers of the same cells (results/reference/paper_tables.csv)._")
    for name in _second_references(table):
        lines.append(f"_{name}: its own published numbers for the same experts and merges "
                     f"(results/reference/{SECOND_REFERENCES[name].name})._")
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")


def to_latex(table: Table) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{_tex_escape(table.caption)}}}",
             r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             "Method & " + " & ".join(_tex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    for row in table.rows:
        if row.section and row is not table.rows[0]:
            lines.append(r"\midrule")
        texts = []
        for value, delta in _cells(table, row):
            arrow = ""
            if delta:
                number = float(delta)
                direction = r"\uparrow" if number > 0 else r"\downarrow" if number < 0 else ""
                arrow = r"\,{\scriptsize $" + direction + "$" + f"{abs(number):.1f}" + "}"
            texts.append(value + arrow)
        lines.append(_tex_escape(row.label) + " & " + " & ".join(texts) + r" \\")
        for name, published in _reference_lines(table, row):
            lines.append(rf"\quad\textit{{{name}}} & " + " & ".join(rf"\textit{{{p}}}" if p else "" for p in published) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [r"\par\footnotesize\textit{" + _tex_escape(note) + "}" for note in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["Method", *table.columns, "±"])
    body = []
    for row in table.rows:
        cells = []
        for value, delta in _cells(table, row):
            color = "" if not delta else ("#1a7f37" if float(delta) > 0 else "#cf222e" if float(delta) < 0 else "")
            suffix = f' <span style="color:{color};font-size:smaller">({delta})</span>' if delta else ""
            cells.append(f"<td>{value}{suffix}</td>")
        stderr = f"{row.stderr:.1f}" if row.stderr is not None else ""
        style = ' style="border-top:2px solid #888"' if row.section else ""
        body.append(f"<tr{style}><th>{html.escape(row.label)}</th>{''.join(cells)}<td>{stderr}</td></tr>")
        for name, published in _reference_lines(table, row):
            body.append(f'<tr style="color:#666;font-style:italic"><td>{html.escape(name)}</td>'
                        + "".join(f"<td>{p}</td>" for p in published) + "<td></td></tr>")
    notes = "".join(f"<p><em>{html.escape(n)}</em></p>" for n in table.notes)
    return (f"<html><body><table border=1 cellspacing=0 cellpadding=4><caption>{html.escape(table.caption)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}</body></html>\n")
