"""The ``epmq_fp`` row is labelled and explained as E-PMQ's sequential continuous relaxation."""

import json

from epmq.cli import main
from tests.test_render import SPEC, metrics  # noqa: F401  (fixture)


def test_tables_with_the_relaxation_row_say_what_it_is(metrics, tmp_path):  # noqa: F811
    # the fixture has no epmq_fp metrics: render E-PMQ's rows under the epmq_fp method name
    import csv

    rows = list(csv.DictReader(metrics.open()))
    for row in rows:
        if row["method"] == "epmq":
            rows.append({**row, "method": "epmq_fp"})
    relaxed = tmp_path / "relaxed.csv"
    with relaxed.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = {**SPEC, "methods": ["gptq", "epmq", "epmq_fp"]}
    assert main(["render", "--target", "t", "--spec", json.dumps(spec), "--metrics", str(relaxed),
                 "--out-dir", str(tmp_path / "tables")]) == 0
    markdown = (tmp_path / "tables" / "t.md").read_text()
    assert "| E-PMQ's sequential continuous relaxation (W*, fp) |" in markdown
    assert "sequential continuous relaxation: every linear replaced by its unrounded E-PMQ target W*" in markdown
    assert "not the E-PMQ model minus its rounding" in markdown
    assert main(["render", "--target", "u", "--spec", json.dumps(SPEC), "--metrics", str(relaxed),
                 "--out-dir", str(tmp_path / "tables")]) == 0
    assert "continuous relaxation" not in (tmp_path / "tables" / "u.md").read_text()
