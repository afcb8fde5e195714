"""Backbones as Flax Linen modules; `registry.MODELS` names every variant."""
