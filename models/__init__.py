"""Flax (Linen) transformer models configured by frozen dataclasses."""
