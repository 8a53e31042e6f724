"""requirements.lock (every package of the extras pinned, ``make lock``) agrees with constraints.txt."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)$")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = PIN.match(line)
            assert match, f"{path.name}: not a name==version pin: {line!r}"
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def test_the_lock_pins_what_the_constraints_pin_and_leaves_torch_to_them():
    lock, constraints = pins(ROOT / "requirements.lock"), pins(ROOT / "constraints.txt")
    assert "torch" not in lock  # a CPU or a CUDA build of constraints.txt's version, as the machine has
    for name, version in constraints.items():
        if name in lock:
            assert lock[name] == version, f"requirements.lock pins {name}=={lock[name]}, constraints.txt {version}"
    assert {"transformers", "snakemake", "numpy", "lm-eval"} <= set(lock)
