"""Shared fixtures: where the shared data lives, and reference models with realistic BatchNorm statistics."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One XLA compilation cache for the session and the processes tests start (they inherit the environment): many
# tests compile the same programs (the real EfficientNet-Lite0's forward pass and steps; a run, its killed twin and
# its resumption). Only compile time changes; a fresh cache each session, so nothing outlives it. With a size
# limit JAX locks the cache, so two processes of one job never write the same entry at once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="jaxtl-tests-xla-")
    atexit.register(shutil.rmtree, _xla_cache, True)
    os.environ |= {"JAX_COMPILATION_CACHE_DIR": _xla_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
                   "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30)}

# jaxtl's own caches (features, decoded images, maps, manifests, weights' hashes) in one folder for the session and
# the processes tests start, not the user's ~/.cache/jaxtl: a run's result never depends on what an earlier session
# left there, and tests that compute the same features share them. Tests of the caches set a folder of their own.
# Made once, by the first process (pytest, or xdist's controller), and inherited by the rest.
if "JAXTL_TESTS_CACHE_DIR" not in os.environ:
    _jaxtl_cache = tempfile.mkdtemp(prefix="jaxtl-tests-cache-")
    atexit.register(shutil.rmtree, _jaxtl_cache, True)
    os.environ |= {"JAXTL_TESTS_CACHE_DIR": _jaxtl_cache, "JAXTL_CACHE_DIR": _jaxtl_cache}

# XLA:CPU's settings for the session and the processes tests start, chosen for compile time: most tests compile
# tiny programs and run them a few times, so compiling is their time. The backend's (LLVM's) optimisation off
# (level 0) and XLA's older loop emitters for fusions instead of its MLIR fusion emitters: the real Lite0's training
# step compiles in 3.8 s instead of 19 s (10.5 s at level 0 alone) and runs up to 4x slower (batch 16 at 64 px:
# 0.14 -> 0.51 s); the tiny ResNet's in 0.6 s instead of 2.0 at level 0. The tests whose time is the programs' run,
# the real backbones on the shared data and trial budgets, are marked `optimized` and compile jaxtl's programs as
# users get them (the fixture below). An XLA_FLAGS that sets an option itself wins; an option this jaxlib does not
# know is left out (XLA would stop at the first compilation). Measured: docs/measured/test_suite.md.
# Set when pytest configures (the xdist workers inherit them from the controller), not on import: scripts that
# tests run in other processes import test modules, and so this file, and keep the XLA_FLAGS their test gave them.
# The flags the session started with are kept in JAXTL_TESTS_USER_XLA_FLAGS for the `optimized` tests, the names
# of the options the suite set in JAXTL_TESTS_XLA_OPTIONS.
OPT_LEVEL = "xla_backend_optimization_level"
FUSION_EMITTERS = "xla_cpu_use_fusion_emitters"
SUITE_XLA = {OPT_LEVEL: ("0", 3), FUSION_EMITTERS: ("false", True)}  # option: (the suite's value, XLA's default)
USER_FLAGS, SUITE_OPTIONS = "JAXTL_TESTS_USER_XLA_FLAGS", "JAXTL_TESTS_XLA_OPTIONS"


def xla_accepts(flags: str) -> bool:
    """Whether a JAX backend starts with `flags` as XLA_FLAGS (XLA stops a process at an unknown flag)."""
    import subprocess
    import sys

    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    try:
        return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pytest_configure(config):
    if USER_FLAGS in os.environ:  # an xdist worker: the controller chose
        return
    user_flags = os.environ[USER_FLAGS] = os.environ.get("XLA_FLAGS", "")
    chosen = [name for name in SUITE_XLA if name not in user_flags]
    if FUSION_EMITTERS in chosen and not xla_accepts(f"--{FUSION_EMITTERS}={SUITE_XLA[FUSION_EMITTERS][0]}"):
        chosen.remove(FUSION_EMITTERS)
    os.environ[SUITE_OPTIONS] = ",".join(chosen)
    if chosen:
        os.environ["XLA_FLAGS"] = " ".join([user_flags, *(f"--{name}={SUITE_XLA[name][0]}" for name in chosen)]).strip()


def suite_xla_options() -> dict[str, str]:
    """The XLA options the suite set for this session (name: its value), as XLA_FLAGS spell them."""
    return {name: SUITE_XLA[name][0] for name in os.environ.get(SUITE_OPTIONS, "").split(",") if name}


@pytest.fixture(scope="session", autouse=True)
def _backend_at_the_suite_level():
    """This process's JAX backend started before its first test, with the session's XLA_FLAGS: XLA reads them once,
    when the backend starts, and one started inside a test that changes them (an optimized test, a test of the
    flags) would compile every later test's programs with that test's options while the processes they start run
    with the suite's (a run trained here and resumed in another process then differs from it in the last bits)."""
    import jax

    jax.devices()


@pytest.fixture(autouse=True)
def _optimized_compilation(request, monkeypatch):
    """A test marked `optimized` compiles jaxtl's programs (`jaxtl.core.compiler.jit`) with XLA's defaults for the
    options the suite set (level 3, the fusion emitters), and the processes it starts with the session's own
    XLA_FLAGS."""
    suite = suite_xla_options()
    if request.node.get_closest_marker("optimized") is None or not suite:
        return
    from jaxtl.core import compiler

    options, defaults = compiler.compiler_options, {name: SUITE_XLA[name][1] for name in suite}
    monkeypatch.setattr(compiler, "compiler_options", lambda: (options() or {}) | defaults)
    user_flags = os.environ.get(USER_FLAGS, "")
    if user_flags:
        monkeypatch.setenv("XLA_FLAGS", user_flags)
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)


# Each xdist worker on cores of its own (and the processes its tests start, which inherit them): XLA sizes its
# thread pool by the cores it may use, so two workers no longer run two threads each on the same cores, spinning
# against each other. Before JAX starts its backend, which happens at a test's first computation.
_worker, _workers = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _worker.startswith("gw") and _workers > 1 and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    if len(_cores) >= _workers:
        os.sched_setaffinity(0, _cores[int(_worker[2:]) % _workers::_workers])

def _file_seconds() -> dict[str, float]:
    """Each test file's seconds, summed over its tests in the durations table `tests/durations/after.txt`."""
    seconds: dict[str, float] = {}
    table = Path(__file__).parent / "durations" / "after.txt"
    for line in table.read_text().splitlines() if table.is_file() else ():
        if line.strip() and not line.startswith("#"):
            value, test = line.split()[0], line.split()[-1]
            name = test.split("::")[0].rsplit("/", 1)[-1]
            seconds[name] = seconds.get(name, 0.0) + float(value.rstrip("s"))
    return seconds


def pytest_collection_modifyitems(config, items):
    """The longest files first, each file's tests in their order: the xdist workers take whole files as they
    become free (`--dist loadfile --no-loadscope-reorder` in pyproject.toml; xdist's own order is by the number
    of tests), so the long files start at once and the short ones fill in at the end. A file the table does not
    know yet goes last."""
    seconds = _file_seconds()
    items.sort(key=lambda item: -seconds.get(item.path.name, 0.0))

def _tiny_variants():
    """The real topologies at a fraction of the width, for tests."""
    import functools

    from jaxtl.models import efficientnet_lite, mobilenet_v2, resnet, vgg, vit

    return (functools.partial(resnet.ResNet, stage_sizes=(1, 1, 1, 1), block_cls=resnet.BasicBlock, width=8),
            functools.partial(efficientnet_lite.EfficientNetLite, width_divisor=8),
            functools.partial(vgg.VGG, depth=11, batch_norm=True, width_divisor=16),
            functools.partial(mobilenet_v2.MobileNetV2, width=0.25),
            functools.partial(vit.VisionTransformer, patch_size=8, dim=16, depth=4, heads=2, mlp_dim=32, image_size=32))


TinyResNet, TinyEfficientNetLite, TinyVGG, TinyMobileNetV2, TinyViT = _tiny_variants()


def shared_data_dir() -> Path:
    """`$JAXTL_DATA_DIR`, else the `../shared/data` beside the checkout."""
    return Path(os.environ.get("JAXTL_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}; set JAXTL_DATA_DIR")
    return path


def calibrate_batchnorm(model, seed: int = 0, image_size: int = 96):
    """Gives a randomly initialised torch model the BatchNorm state of a trained one, then sets eval mode.

    Fresh BatchNorm layers hold mean 0, var 1, scale 1, bias 0: a converter that swapped mean and var, or scale
    and bias, would go unnoticed, and without normalisation a deep random net's output collapses to a constant
    (EfficientNet-Lite's does). Here the affine parameters are drawn at random and the running statistics are
    the exact averages of the model's own train-mode forward passes over random images.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, image_size, image_size, generator=generator))
    return model.eval()


def make_image_folder(root: Path, classes=("red", "green", "blue"), per_class: int = 12, size=(40, 32), splits=None,
                      textured: bool = False):
    """A tiny learnable dataset: each class a noisy solid colour (or, `textured`, a smooth random pattern tinted
    by the class colour, less degenerate for BatchNorm). With `splits`, one sub-folder per split."""
    import numpy as np
    from PIL import Image

    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (120, 120, 120)}
    rng = np.random.RandomState(0)
    for split in splits or (None,):
        for name in classes:
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                if textured:
                    low = Image.fromarray((rng.rand(5, 5, 3) * 255).astype(np.uint8))
                    pattern = np.asarray(low.resize(size, Image.BICUBIC), np.float32)
                    pixels = np.clip(0.5 * pattern + 0.5 * np.array(colours[name]), 0, 255)
                else:
                    pixels = np.clip(np.array(colours[name]) + rng.randn(size[1], size[0], 3) * 25, 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def tiny_config(data_path, **overrides):
    """A config that trains a width-8 ResNet-18 (random init) on 32x32 images, quickly, with `overrides`
    (`{"train.epochs": 3}`). Tiny settings that the resulting path does not read are left at their defaults, so
    the config passes the unread-key check whatever the strategy."""
    from jaxtl.config import apply_overrides, base_config, leaves, set_value
    from jaxtl.train.run import keys_read

    tiny = {"progress": False, "model.name": "resnet18", "model.weights": None, "model.kwargs": {"width": 8},
            "data.path": str(data_path), "data.input_size": 32, "data.val_fraction": 0.25,
            "transfer.strategy": "scratch", "optimizer.lr": 0.05, "optimizer.warmup_epochs": 0.0,
            "train.epochs": 2, "train.batch_size": 8}
    config = base_config()
    for key, value in tiny.items():
        if key == "model.kwargs":
            config.model.kwargs.update(value)
        else:
            set_value(config, key, value, "tiny_config")
    config = apply_overrides(config, [f"{k}={v!r}" for k, v in overrides.items()])
    read, defaults = keys_read(config), leaves(base_config())
    for key in tiny:
        if key not in read and key not in overrides and key in defaults:
            set_value(config, key, defaults[key], "tiny_config")
    return config


def _write_generated_folder(root: Path, names, draw, per_class: int, val_per_class: int, seed: int):
    """`root/{train,val}/<name>/NNN.png`, each image `draw(rng, label)` (a uint8 HxWx3 array)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(draw(rng, label)).save(folder / f"{i:03d}.png")
    return root


def make_glyph_folder(root: Path, per_class: int = 150, val_per_class: int = 75, size: int = 64, seed: int = 0):
    """An "F" against its mirror image, small, anywhere, in random colours on noise: ImageNet features pooled are
    nearly mirror-invariant (flip augmentation), so a linear probe sees little; fine-tuning learns the handedness."""
    import numpy as np
    from PIL import Image, ImageDraw

    def draw(rng, label):
        image = Image.fromarray(np.clip(rng.normal(120, 30, (size, size, 3)), 0, 255).astype(np.uint8))
        pen = ImageDraw.Draw(image)
        s, w = int(rng.integers(10, 18)), int(rng.integers(2, 4))
        x, y = int(rng.integers(s + 2, size - s - 2)), int(rng.integers(2, size - 2 * s - 2))
        colour, sign = tuple(int(v) for v in rng.integers(0, 255, 3)), -1 if label else 1
        pen.line([(x, y), (x, y + 2 * s)], fill=colour, width=w)
        pen.line([(x, y), (x + sign * s, y)], fill=colour, width=w)
        pen.line([(x, y + s), (x + sign * int(0.7 * s), y + s)], fill=colour, width=w)
        return np.asarray(image)

    return _write_generated_folder(root, ("f", "mirrored_f"), draw, per_class, val_per_class, seed)


def make_dark_shapes_folder(root: Path, per_class: int = 150, val_per_class: int = 50, size: int = 64, seed: int = 0):
    """A faint circle against a faint square, a few grey levels above a nearly black background: pooled pretrained
    features separate them perfectly once standardised (a linear probe); fine-tuning from such inputs starts lost."""
    import numpy as np
    from PIL import Image, ImageDraw

    def draw(rng, label):
        canvas = Image.new("L", (size, size), 0)
        r = int(rng.integers(8, 16))
        x, y = int(rng.integers(r + 2, size - r - 2)), int(rng.integers(r + 2, size - r - 2))
        shape = ImageDraw.Draw(canvas).ellipse if label == 0 else ImageDraw.Draw(canvas).rectangle
        shape([x - r, y - r, x + r, y + r], fill=1)
        pixels = 6 + 3 * np.asarray(canvas, np.float32)[..., None] + rng.normal(0, 0.7, (size, size, 3))
        return np.clip(np.round(pixels), 0, 255).astype(np.uint8)

    return _write_generated_folder(root, ("circle", "square"), draw, per_class, val_per_class, seed)
