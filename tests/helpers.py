"""What several test files do the same way, in one place: config files for runs in other processes, the command
line in this process or in another, a run interrupted by a signal, and the check that a resumed run ended as the
uninterrupted one did."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SUITE_XLA


def cpu_devices_env(devices: int, **extra: str) -> dict:
    """The environment for a process of `devices` CPU devices (`JAX_NUM_CPU_DEVICES`), with of this session's
    `XLA_FLAGS` only those setting the options the suite chooses (conftest.py), whoever set them."""
    kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if any(name in flag for name in SUITE_XLA)]
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), XLA_FLAGS=" ".join(kept), **extra)


def config_file(tmp_path: Path, data, overrides: dict | None = None, *, tiny: bool = True,
                name: str = "tiny.py") -> str:
    """A config file for `run.py --config`: `tiny_config(data, **overrides)` (tests.conftest), or with `tiny=False`
    jaxtl's base config with `data.path=data` and `overrides` (e.g. the real EfficientNet-Lite0)."""
    path = tmp_path / name
    overrides = dict(overrides or {})
    if tiny:
        path.write_text("from tests.conftest import tiny_config\ndef get_config():\n"
                        f"    return tiny_config({str(data)!r}, **{overrides!r})\n", encoding="utf-8")
    else:
        values = [f"{k}={v!r}" for k, v in ({"data.path": str(data)} | overrides).items()]
        path.write_text("from jaxtl.config import apply_overrides, base_config\n"
                        f"def get_config():\n    return apply_overrides(base_config(), {values!r})\n", encoding="utf-8")
    return str(path)



def lite0_config(data, tmp_path: Path, **overrides):
    """jaxtl's base config (the real EfficientNet-Lite0) on generated data at 64x64, batch 16, AdamW at 1e-3,
    no flip, mild crops, the feature cache under `tmp_path`; `overrides` on top (for `auto`'s trials)."""
    from jaxtl.config import apply_overrides, base_config

    values = {"progress": False, "data.path": str(data), "data.input_size": 64, "train.batch_size": 16,
              "optimizer.name": "adamw", "optimizer.lr": 1e-3, "data.augment.flip": False,
              "data.augment.crop_scale": (0.8, 1.0), "features.cache_dir": str(tmp_path / "cache")} | overrides
    return apply_overrides(base_config(), [f"{k}={v!r}" for k, v in values.items()])


@dataclasses.dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, env=None) -> CliResult:
    """`run.py ARGS` in a new process: for what only a process boundary shows (signals, exit codes of a crash,
    the console script)."""
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, env=env, timeout=600)
    return CliResult(result.returncode, result.stdout, result.stderr)


def cli(*args) -> CliResult:
    """`run.py ARGS` in this process, with its output captured and its exit code as a process would have it:
    what `main` prints and how it exits are the same, without starting Python and JAX again. A bug (any exception
    that is not the user's to fix) propagates and fails the test with its traceback, as a process would show it.
    The logging set-up `main` makes is undone afterwards, so later tests see the logger as pytest left it."""
    from jaxtl.cli import main

    logger = logging.getLogger("jaxtl")
    saved = logger.handlers[:], logger.propagate, logger.level, sys.unraisablehook
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        logger.handlers[:], logger.propagate, logger.level, sys.unraisablehook = saved
    return CliResult(code, out.getvalue(), err.getvalue())


def one_line_error(result: CliResult, *named) -> str:
    """Exit code 2 and one line on stderr naming each of `named` (no traceback); returns the line."""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for name in named:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def interrupted(tmp_path: Path, data, overrides: dict, signal_number: int, *, at_step: int = 4,
                name: str = "interrupted"):
    """Starts `train` in a new process, sends it `signal_number` once `checkpoints/<at_step>` exists (step 4:
    inside the second epoch of three steps each, the next save being at step 8) and returns the workdir, the
    command (to resume with), the exit code and the process's stderr."""
    workdir = tmp_path / name
    command = ["train", "--config", config_file(tmp_path, data, overrides, name=f"{name}.py"), "--workdir",
               str(workdir)]
    process = subprocess.Popen([sys.executable, str(REPO / "run.py"), *command], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / str(at_step)).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=300)
    assert not (workdir / "summary.json").exists(), "the run finished before it could be interrupted"
    return workdir, command, process.returncode, stderr


def killed_and_resumed(tmp_path: Path, data, overrides: dict) -> tuple[Path, CliResult]:
    """A run killed (SIGKILL) inside its second epoch in another process, then resumed by the same command in this
    one; returns the workdir and the resumption's output."""
    workdir, command, code, _ = interrupted(tmp_path, data, overrides, signal.SIGKILL)
    assert code == -signal.SIGKILL
    resumed = cli(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return workdir, resumed


def metrics(workdir: Path) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl`, one per epoch (or per L2 of a probe's search)."""
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(workdir: Path, reference: dict, straight_dir: Path) -> None:
    """The run in `workdir` (interrupted and resumed) ended as the uninterrupted one in `straight_dir` did: the
    same summary, each epoch once, every epoch's losses (the interrupted epoch's too: its running sums were
    saved)."""
    resumed = json.loads((workdir / "summary.json").read_text())
    for key in ("best_val_accuracy", "final_val_accuracy", "steps", "best_epoch"):
        assert resumed[key] == reference[key], key
    assert resumed["final_val"]["loss"] == pytest.approx(reference["final_val"]["loss"], rel=1e-6)
    records, straight = metrics(workdir), metrics(straight_dir)
    assert [r["epoch"] for r in records] == [r["epoch"] for r in straight]  # each epoch once
    for mine, theirs in zip(records, straight):
        np.testing.assert_allclose([mine["train_loss"], mine["val_loss"]], [theirs["train_loss"], theirs["val_loss"]],
                                   rtol=1e-6)


def weight_reads(monkeypatch) -> list:
    """The paths every weights-file read from now on gives (`jaxtl.weights.create.read_state_dict`), to count them."""
    import jaxtl.weights.create as create

    reads, read = [], create.read_state_dict
    monkeypatch.setattr(create, "read_state_dict", lambda path: reads.append(path) or read(path))
    return reads


def forward(model, variables, images, **kwargs):
    """`model.apply(variables, images, **kwargs)` under jit: op by op, a tiny EfficientNet-Lite0's forward pass
    compiles some 440 one-op programs (10 s); under jit, one."""
    import jax

    return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, images)
