"""The README's mergekit -> compressed-tensors walkthrough runs as written, as a new user would run it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "### From a mergekit config to a checkpoint transformers loads"


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(HEADING):]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.slow
def test_the_walkthrough_runs_and_transformers_loads_the_result(tmp_path):
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")  # the commands run from the repository root
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "Qwen2ForCausalLM CompressedTensorsConfig"
    assert "total merging deviation (relative)" in done.stdout
    for path in ("example/merged/merge.json", "example/diagnose/diagnose.png",
                 "example/merged-epmq-w4g32/quantization.json", "example/merged-epmq-w4g32-ct/config.json"):
        assert (tmp_path / path).exists(), path
