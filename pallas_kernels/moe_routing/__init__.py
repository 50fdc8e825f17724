"""Mixture-of-experts routing for dropless MoE: top-k gating, token permutation and grouped matmuls.

xla.py            plain jnp routing: `top_k_gating` (the models' XLA gating),
                  and the specs `permute`, `unpermute`, `moe_mlp_loop`;
gmm_reference.py  the loop specification of the grouped matmuls (`gmm`, `tgmm`)
                  and their group offsets;
tiles.py          the per-tile math of both backends (gating kernel bodies,
                  the tile product);
gating_{gpu,tpu}.py, gmm_{gpu,tpu}.py  the Triton and Mosaic kernels;
gating_ops.py, gmm_ops.py  the public kernels: validation, padding, backend
                  choice and custom VJPs;
routing_ops.py    `permute` / `unpermute` with gather-only VJPs, and
                  `moe_dropless`, which `models/moe.py` runs (Pallas or XLA).
"""
