"""README's promises that code can check: the own-loop example runs as printed and learns; the commands it shows
exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _python_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


@pytest.mark.slow
def test_the_own_loop_example_runs_as_printed_and_learns(data_dir, tmp_path):
    """The "Your own loop" block, run as it stands in a fresh process: it prints each epoch's val accuracy, and the
    last is well above chance (ants vs bees: 0.5)."""
    (block,) = _python_blocks("Your own loop")
    script = tmp_path / "own_loop.py"
    script.write_text(block)
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "JAXTL_DATA_DIR": str(data_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    accuracies = [float(a) for a in re.findall(r"val accuracy ([0-9.]+)", result.stdout)]
    assert len(accuracies) == 2 and accuracies[-1] >= 0.85, result.stdout


@pytest.mark.slow
def test_the_jaxtl_command_is_installed_beside_run_py():
    """The install puts a `jaxtl` console script beside the interpreter; it, `python -m jaxtl` and `run.py` are
    one command line."""
    script = Path(sys.executable).parent / "jaxtl"
    assert script.is_file(), f"{script} missing: install with the README's command (pip install -e .)"
    for command in ([str(script)], [sys.executable, "-m", "jaxtl"], [sys.executable, str(REPO / "run.py")]):
        result = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0 and "train" in result.stdout and "advise" in result.stdout, result.stderr
