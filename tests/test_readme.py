"""The README's and the docs' promises that code can check: the own-loop guide's example runs as printed and
learns; README stays short and every link in it and in the docs leads to a file; the commands it shows exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / page).read_text(), re.S)


@pytest.mark.slow
@pytest.mark.optimized
def test_the_own_loop_example_runs_as_printed_and_learns(data_dir, tmp_path):
    """The own-loop guide's block, run as it stands in a fresh process: it prints each epoch's val accuracy, and the
    last is well above chance (ants vs bees: 0.5)."""
    (block,) = _python_blocks("docs/guides/own_loop.md")
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


def test_readme_is_short_and_its_links_and_the_docs_links_lead_to_files():
    """README stays a five-minute read (<= 200 lines, none past 120 characters but its table rows); every relative
    link in it and in the docs' pages names a file of the checkout (the docs build catches links between pages, not
    links into the repository)."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert [line for line in readme.splitlines() if len(line) > 120 and not line.startswith("|")] == []
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    assert len(pages) > 10
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)}: {target}")
    assert missing == []
