"""Freezing and learning rates by layer group; the transfer strategies as presets of per-group LR multipliers."""
