"""The dress rehearsal on a real one-node SLURM (scripts/slurm-rehearsal.sh): a DAG through
`--profile profiles/slurm` and snakemake-executor-plugin-slurm (real sbatch, sacct) builds the same
tables as a local run, every job with the account, partition and GPU type from EPMQ_SLURM_*.

Needs root (munged, MariaDB and the SLURM daemons) and Debian's slurm-wlm, munge, slurmdbd and
mariadb-server, which the script installs when missing; skipped where that cannot be done. The DAG is
the smoke config's table_5 (every stage of an offline suite: data, pretraining, fine-tuning,
calibration, merge, three quantizers, evaluation, aggregate, render)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-rehearsal.sh"
CANNOT_RUN_HERE = 77


@pytest.mark.slow
@pytest.mark.rehearsal
@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="starts munged, MariaDB and SLURM daemons: needs root")
@pytest.mark.skipif(not shutil.which("apt-get") and not shutil.which("slurmctld"),
                    reason="no SLURM packages and no apt-get to install them")
def test_slurm_run_builds_what_the_local_run_builds(tmp_path):
    env = {**os.environ, "EPMQ_REHEARSAL_DIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([str(SCRIPT), "config/smoke.yaml", "table_5"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode == CANNOT_RUN_HERE:
        pytest.skip(out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "slurm-rehearsal: passed" in out.stdout
    # the rerun check and the per-rule job table come from the script; the daemons are gone again
    assert "quantize" in out.stdout and "evaluate" in out.stdout
    assert not (Path("/etc/slurm") / "slurm.conf").exists()
    running = subprocess.run(["pgrep", "-x", "slurmctld|slurmd|slurmdbd"], capture_output=True, text=True)
    assert running.stdout == "", running.stdout
