"""What freezing costs: train-step time against forward-only time, and optimizer-state size, per strategy.

    python benchmarks/freeze_cost.py [--model efficientnet_lite0] [--batch-size 16] [--iters 3]

Frozen groups should cost nothing beyond their forward pass: with everything below the head frozen the step
should take about as long as the forward pass alone (target: ratio <= 1.15), and frozen groups hold no
optimizer state. All timings are of compiled steps after a warm-up call, in one run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxtl
from jaxtl.sharding import global_batch, make_mesh
from jaxtl.train.steps import TrainState, make_train_step
from jaxtl.transfer.optimizer import make_optimizer
from jaxtl.transfer.strategies import make_phases


def _time(fn, iters: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


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
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    forward_s = _time(lambda: forward(variables, sharded["images"]).block_until_ready(), args.iters)
    print(f"{args.model}, batch {args.batch_size}, {size}x{size}, {jax.devices()[0].platform}; "
          f"forward only: {forward_s * 1000:.0f} ms")
    print(f"{'strategy':<26}{'step ms':>9}{'step/fwd':>10}{'opt state MB':>14}{'trainable params':>18}")
    for label, strategy, kwargs in (("linear_probe (freeze all)", "linear_probe", {}),
                                    ("finetune_top (stage4)", "finetune_top", {"num_stages": 1}),
                                    ("finetune_all", "finetune_all", {})):
        (phase,) = make_phases(strategy, 1, **kwargs)
        tx = make_optimizer(variables["params"], phase, optax.constant_schedule(1e-3), "sgd")
        opt_state = tx.init(variables["params"])
        state = TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"], opt_state,
                           jax.random.key_data(jax.random.key(0)))
        step = make_train_step(model, tx, phase.frozen, phase.frozen, 0.0, mesh)
        # Placed as the step's outputs are, so the warm-up call's output does not trigger a second compile.
        holder = {"state": jax.device_put(jax.tree_util.tree_map(jnp.copy, state), replicated)}

        def run():
            holder["state"], sums = step(holder["state"], sharded)
            sums["loss"].block_until_ready()

        step_s = _time(run, args.iters)
        state_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(opt_state)) / 2**20
        trainable = sum(x.size for g in phase.trainable for x in jax.tree_util.tree_leaves(variables["params"][g]))
        print(f"{label:<26}{step_s * 1000:>9.0f}{step_s / forward_s:>10.2f}{state_mb:>14.2f}{trainable:>18,}", flush=True)


if __name__ == "__main__":
    main()
