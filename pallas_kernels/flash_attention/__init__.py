"""Attention: the pure-jnp reference (spec and CPU path); kernels arrive beside it."""
