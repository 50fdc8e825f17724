"""The GPU kernels lower to Triton IR (run on CPU: `lowering_platforms=('cuda',)`).

The interpreter accepts operations Triton does not; lowering catches those
(and non-power-of-2 tiles) in CI. Compiling the IR to PTX needs a GPU.
"""

import jax.numpy as jnp
import pytest

import testing_utils as tu


@pytest.mark.usefixtures('lowering_only')
@pytest.mark.parametrize('heads,kv_heads,length,head_dim,features', [
    # Everything at once, odd length.
    (8, 2, 1000, 128, ('causal', 'segments', 'prefix', 'alibi', 't5')),
    (4, 4, 512, 64, ()),  # plain bidirectional MHA: no masks, no block table
    (4, 1, 300, 80, ('causal', 'segments')),  # MQA, head_dim padded to 128
])
def test_forward_and_backward_lower_to_triton(heads, kv_heads, length, head_dim, features):
  fwd, bwd = tu.lower_flash_attention('gpu', heads, kv_heads, length, length, head_dim,
                                      jnp.bfloat16, features)
  for text, kernels in ((fwd, ['flash_attention_fwd']),
                        (bwd, ['flash_attention_dkdv', 'flash_attention_dq'])):
    assert 'tt.divisibility' in text  # serialized Triton IR, not an interpreted loop
    for name in kernels:
      assert name in text
