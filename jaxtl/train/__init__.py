"""Train state, jitted data-parallel steps, the epoch loop, checkpoints and reports."""
