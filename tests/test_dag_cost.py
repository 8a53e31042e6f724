"""bench/dag_cost.py: per-rule job seconds of a built DAG from Snakemake's benchmark files."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("dag_cost", Path(__file__).parent.parent / "bench" / "dag_cost.py")
dag_cost = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(dag_cost)

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write(path: Path, wall: float, cpu: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{wall}\t0:00:00\t1\t1\t1\t1\t0\t0\t50\t{cpu}\n")


def test_groups_by_rule_and_quantizer_and_sums(tmp_path):
    root = tmp_path / "benchmarks"
    write(root / "s" / "suite_pretrain.tsv", 100.0, 180.0)
    write(root / "s" / "evaluate" / "merged" / "ties.tsv", 30.0, 20.0)
    write(root / "s" / "evaluate" / "quant" / "ties" / "gptq" / "w4g128n256.tsv", 40.0, 25.0)
    write(root / "s" / "quantize" / "ties" / "epmq-a0.01" / "w4g128n256.tsv", 50.0, 45.0)
    write(root / "s" / "quantize" / "ties" / "epmq-a0" / "w4g128n256.tsv", 10.0, 5.0)
    write(root / "s" / "quantize" / "ties" / "epmq_fp-a0.01" / "w4g128n256.tsv", 7.0, 6.0)
    write(root / "tables" / "t1.render.tsv", 2.0, 1.0)
    write(root / "tables" / "other.render.tsv", 99.0, 99.0)

    groups = dag_cost.suite_costs(root, "s", ["t1"])
    assert sorted(groups) == ["evaluate", "quantize epmq", "quantize epmq_fp", "render", "suite_pretrain"]
    assert groups["evaluate"] == [(30.0, 20.0), (40.0, 25.0)]
    assert groups["quantize epmq"] == [(10.0, 5.0), (50.0, 45.0)]
    text = dag_cost.report(groups, cores=2)
    assert "total                  7     239.0     282.0" in text
    assert "= 141 s" in text


def test_missing_suite_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        dag_cost.main(["--suite", "nope", "--benchmarks", str(tmp_path)])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_unknown_target_exits_2(tmp_path, capsys):
    write(tmp_path / "s" / "merge" / "ties.tsv", 1.0, 1.0)
    with pytest.raises(SystemExit) as exc:
        dag_cost.main(["--suite", "s", "--targets", "t9", "--benchmarks", str(tmp_path)])
    assert exc.value.code == 2
    assert "t9" in capsys.readouterr().err


def test_pending_jobs_are_costed_at_their_group_mean_else_their_rule_mean():
    dry_run = """
rule quantize:
    output: results/s/quant/ties/awq/w4g128n256
    benchmark: benchmarks/s/quantize/ties/awq/w4g128n256.tsv
rule quantize:
    benchmark: benchmarks/s/quantize/ties/epmq-a0/w4g128n256.tsv
rule evaluate:
    benchmark: benchmarks/s/evaluate/quant/ties/awq/w4g128n256.tsv
rule render:
    benchmark: benchmarks/tables/t1.render.tsv
rule merge:
    benchmark: benchmarks/s/merge/wudi.tsv
rule evaluate:
    benchmark: benchmarks/other/evaluate/merged/ties.tsv
localrule t1:
    input: results/tables/t1.csv
"""
    pending = dag_cost.pending_groups(dry_run, "s")
    assert pending == ["quantize awq", "quantize epmq", "evaluate", "render", "merge"]
    groups = {"quantize epmq": [(1.0, 40.0), (1.0, 60.0)], "quantize gptq": [(1.0, 20.0)], "evaluate": [(1.0, 30.0)],
              "render": [(1.0, 2.0)]}
    cpu, uncosted = dag_cost.projection(groups, pending)
    # awq: no awq measured, so the mean of every quantize job (40); epmq 50; evaluate 30; render 2; merge uncosted
    assert cpu == 40.0 + 50.0 + 30.0 + 2.0
    assert uncosted == ["merge"]


def test_several_suites_sum_per_rule_and_count_the_tables_once(tmp_path, capsys):
    write(tmp_path / "a" / "merge" / "ties.tsv", 1.0, 2.0)
    write(tmp_path / "b" / "merge" / "ties.tsv", 3.0, 4.0)
    write(tmp_path / "b" / "evaluate" / "merged" / "ties.tsv", 5.0, 6.0)
    write(tmp_path / "tables" / "t1.render.tsv", 7.0, 8.0)
    assert dag_cost.main(["--suite", "a", "b", "--targets", "t1", "--benchmarks", str(tmp_path)]) == 0
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert lines["merge"] == ["2", "4.0", "6.0"] and lines["evaluate"] == ["1", "5.0", "6.0"]
    assert lines["render"] == ["1", "7.0", "8.0"] and lines["total"] == ["4", "16.0", "20.0"]
    assert dag_cost.pending_groups("    benchmark: benchmarks/tables/t1.render.tsv\n", "b", tables=False) == []
