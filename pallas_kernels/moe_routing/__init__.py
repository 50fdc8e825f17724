"""Mixture-of-experts routing: token routing and grouped matmuls (gmm, tgmm), kernels beside
their pure-jnp references."""
