"""README.md works as written: its bash and Python blocks run in order, as a new user
would type them, in a copy of the checkout.

A block preceded by `<!-- readme-test: skip (why) -->` is not run (installs, GPUs, a
cluster, the peers of the speed benchmark); every other ```bash / ```python block is.
Bash blocks run through `bash -e`; Python blocks run one after another in one Python
process (later blocks use names earlier ones define, as in a session). The data a user
brings (`my.xyz` in README) is a slice of the bundled ethanol set.

Small settings, so that the whole README runs in a few minutes: `SMALL_TRAINING` is
appended to every `python train.py` command (later overrides win), and `SHORTER`
replaces the long MD runs' step counts. Each replaced text must be in README: an edit
that changes it fails here instead of silently running 10 000 MD steps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<why>[^)]+)\) -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)

SMALL_TRAINING = (
    "train.max_epochs=1 data.max_frames=24 model.num_layers=1 model.num_features=4 model.l_max=1 "
    "train.batch_size=4 train.progress=false"
)
SHORTER = [  # (text in README, what runs instead)
    ("--steps 10000", "--steps 10"),
    ("steps=10_000", "steps=10"),
    ("jax.lax.fori_loop(0, 100, step", "jax.lax.fori_loop(0, 5, step"),
    ("for _ in range(100):", "for _ in range(2):"),
]

# The driver: runs the blocks (a JSON list of [language, line, text]) in order.
DRIVER = """
import json, subprocess, sys, time
namespace = {"__name__": "__readme__"}
start = time.perf_counter()
for language, line, text in json.load(open(sys.argv[1])):
    print(f"--- README.md:{line} ({language}) at {time.perf_counter() - start:.0f} s", flush=True)
    if language == "bash":
        subprocess.run(["bash", "-e", "-c", text], check=True)
    else:
        exec(compile(text, f"README.md:{line}", "exec"), namespace)
"""


def readme_blocks() -> list[tuple[str, int, str, str | None]]:
    """(language, line, text, why skipped or None) of README's fenced bash/python blocks."""
    text = (ROOT / "README.md").read_text()
    return [
        (m["lang"], text.count("\n", 0, m.start("body")) + 1, m["body"], m["why"])
        for m in BLOCK.finditer(text)
    ]


def small(language: str, text: str) -> str:
    for old, new in SHORTER:
        text = text.replace(old, new)
    if language == "bash":  # every train.py command line (continuations joined) gets the small overrides
        lines = text.replace("\\\n", " ").splitlines()
        text = "\n".join(
            re.sub(r"^(\s*[^#]*python train\.py[^#]*?)(\s*(#.*)?)$", rf"\1 {SMALL_TRAINING}\2", line) for line in lines
        )
    return text


def test_readme_blocks_are_found_and_skips_say_why():
    blocks = readme_blocks()
    assert len([b for b in blocks if b[3] is None]) >= 10, "the README's runnable blocks were not found"
    readme = (ROOT / "README.md").read_text()
    for old, _ in SHORTER:
        assert old in readme, f"SHORTER names {old!r}, which README no longer has: update tests/test_readme.py"
    assert small("bash", "python train.py --config x.yaml a=1 \\\n    b=2   # note") == f"python train.py --config x.yaml a=1      b=2 {SMALL_TRAINING}   # note"


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path):
    for entry in ROOT.iterdir():  # a checkout: the repository's files, a fresh runs/
        if entry.name not in ("runs",) and not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    ase.io.write(tmp_path / "my.xyz", ase.io.read(ROOT / "data" / "ethanol_xtb.xyz", ":40"))  # "your own data"
    runnable = [(lang, line, small(lang, text)) for lang, line, text, why in readme_blocks() if why is None]
    (tmp_path / "blocks.json").write_text(json.dumps(runnable))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`: this one, as in an activated venv
    result = subprocess.run(
        [sys.executable, "driver.py", "blocks.json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    # What the blocks promise exists: run folders, plots, the evaluation, the MD trajectory, the export.
    for path in ("runs/default/model", "runs/nequip_cu/model", "runs/mine/results.json", "runs/tuned/model",
                 "runs/default/plots/parity_forces.png", "metrics.json", "traj.extxyz", "cu.mpnnx"):
        assert (tmp_path / path).exists(), path
