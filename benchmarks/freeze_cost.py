"""What freezing costs: train-step time against forward-only time, and optimizer-state size, per rule set.

    python benchmarks/freeze_cost.py [--model efficientnet_lite0] [--batch-size 16] [--iters 3]

Frozen parameters should cost nothing beyond their forward pass: with everything below the head frozen the
step should take about as long as the forward pass alone (target: ratio <= 1.15), frozen parameters hold no
optimizer state, and freezing by a rule that cuts a stage in half costs between freezing the whole stage and
training it. All timings are of compiled steps after a warm-up call, in one run.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import jaxtl
from jaxtl.core.compiler import jit
from jaxtl.core.sharding import global_batch, make_mesh
from jaxtl.models.lora import add_lora, default_targets
from jaxtl.rules import match_rules, tree_paths
from jaxtl.train.steps import step_for_rules
from jaxtl.transfer.strategies import make_phases


def _time(fn, iters: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def _rule_sets(model) -> list[tuple[str, tuple]]:
    groups = model.backbone.groups
    preset = lambda strategy, **kw: make_phases(strategy, 1, groups, **kw)[0].rules  # noqa: E731
    last = groups[-1]
    modules = sorted({path.split("/")[2] for path in _paths(model) if path.startswith(f"backbone/{last}/")},
                     key=lambda name: (not name.startswith("block"), int(name[5:]) if name[5:].isdigit() else 0))
    second_half = modules[len(modules) // 2:]
    half = (("head/.*", 1.0), (f"backbone/{last}/({'|'.join(second_half)})/.*", 1.0), (".*", 0.0))
    return [("linear_probe (freeze all)", preset("linear_probe")),
            (f"half of {last} + head", half),
            (f"finetune_top ({last} + head)", preset("finetune_top", num_stages=1)),
            ("norm_only", preset("norm_only")),
            ("bitfit", preset("bitfit")),
            ("lora (rank 8, 1x1 convs)", preset("lora")),
            ("finetune_all", preset("finetune_all"))]


def _paths(model):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    return jax.tree_util.tree_leaves(tree_paths(variables["params"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    model, variables = jaxtl.create_model(args.model, num_classes=10)
    size = jaxtl.get_preprocessing(args.model).input_size
    rng = np.random.RandomState(0)
    batch = {"images": rng.randn(args.batch_size, size, size, 3).astype(np.float32),
             "labels": rng.randint(0, 10, args.batch_size).astype(np.int32),
             "mask": np.ones(args.batch_size, np.float32)}
    mesh = make_mesh()
    sharded = global_batch(batch, mesh)
    forward = jit(lambda v, x: model.apply(v, x, train=False)[0])
    forward_s = _time(lambda: forward(variables, sharded["images"]).block_until_ready(), args.iters)
    print(f"{args.model}, batch {args.batch_size}, {size}x{size}, {jax.devices()[0].platform}; "
          f"forward only: {forward_s * 1000:.0f} ms")
    print(f"{'rules':<28}{'step ms':>9}{'step/fwd':>10}{'opt state MB':>14}{'trainable params':>18}")
    for label, rules in _rule_sets(model):
        run_model, run_variables = model, variables
        if label.startswith("lora"):  # rank-8 factors beside the family's default kernels, alpha 16
            params = add_lora(variables["params"], default_targets(variables["params"]), 8, jax.random.key(0))
            run_model, run_variables = model.clone(lora_scale=2.0), dict(variables, params=params)
        step, state = step_for_rules(run_model, run_variables, rules, optax.constant_schedule(1e-3), mesh)
        holder = {"state": state}

        def run():
            holder["state"], sums = step(holder["state"], sharded)
            sums["loss"].block_until_ready()

        step_s = _time(run, args.iters)
        state_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(holder["state"].opt_state)) / 2**20
        multipliers = match_rules(run_variables["params"], rules, label)
        trainable = sum(x.size for x, m in zip(jax.tree_util.tree_leaves(run_variables["params"]),
                                               jax.tree_util.tree_leaves(multipliers)) if m)
        print(f"{label:<28}{step_s * 1000:>9.0f}{step_s / forward_s:>10.2f}{state_mb:>14.2f}{trainable:>18,}",
              flush=True)


if __name__ == "__main__":
    main()
