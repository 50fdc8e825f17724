"""The TPU (Mosaic) flash attention kernels lower for TPU on any machine.

`lower(lowering_platforms=('tpu',))` runs the Pallas-to-Mosaic lowering,
including its block-shape checks, without a TPU; only Mosaic's own layout
passes wait for a real TPU compile. Numerics are checked elsewhere (the
kernels run in the TPU interpreter there).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import tiles
from pallas_kernels.flash_attention import tpu

import testing_utils as tu

pytestmark = pytest.mark.usefixtures('lowering_only')

FEATURES = ('causal', 'prefix', 'segments', 'alibi', 't5')


def _lower(heads, kv_heads, q_len, kv_len, head_dim, dtype, features, block_sizes):
  return tu.lower_flash_attention('tpu', heads, kv_heads, q_len, kv_len, head_dim, dtype,
                                  features, block_sizes)


@pytest.mark.parametrize('heads,kv_heads,q_len,kv_len,head_dim,dtype,features,blocks', [
    # Everything at once, GQA, bf16: the default blocks and mixed 128/256/512 ones.
    (8, 2, 1024, 1024, 128, jnp.bfloat16, FEATURES, None),
    (8, 2, 1024, 1024, 128, jnp.bfloat16, FEATURES, (256, 512, 128, 256, 512, 128)),
    # Unmasked MHA in f32 (fp32-precision matmuls), no scalar prefetch at all.
    (4, 4, 512, 512, 128, jnp.float32, (), (128, 256, 128, 128, 256, 128)),
    # MQA cross attention with odd lengths: padded, and short blocks clipped to
    # the whole padded length; head_dim 64 is not padded.
    (4, 1, 200, 1000, 64, jnp.bfloat16, ('causal', 'alibi'), (512, 256, 256, 256, 256, 256)),
])
def test_lowers_for_tpu(heads, kv_heads, q_len, kv_len, head_dim, dtype, features, blocks):
  bs = None if blocks is None else tpu.BlockSizes(*blocks)
  fwd, bwd = _lower(heads, kv_heads, q_len, kv_len, head_dim, dtype, features, bs)
  assert fwd.count('tpu_custom_call') == 1 and 'flash_attention_fwd' in fwd
  assert bwd.count('tpu_custom_call') == 3
  for name in ('flash_attention_fwd', 'flash_attention_dkdv', 'flash_attention_dq'):
    assert name in bwd


def test_lowering_rejects_blocks_mosaic_cannot_tile():
  # 136 is neither a multiple of 128 nor the whole (padded) length of 1024.
  with pytest.raises(Exception, match='divisible by 8 and 128'):
    _lower(4, 4, 1024, 1024, 128, jnp.bfloat16, ('causal',), tpu.BlockSizes(*[136] * 6))


def test_block_sizes():
  with pytest.raises(ValueError, match='block_k_dq'):
    tpu.BlockSizes(block_k_dq=100)
  with pytest.raises(ValueError, match='block_q'):
    tpu.BlockSizes(block_q=0)
  bs = tpu.BlockSizes(block_q=384, block_k=512, block_q_dkv=256, block_k_dkv=128,
                      block_q_dq=128, block_k_dq=256)
  assert (bs.q_multiple, bs.kv_multiple) == (768, 512)
  # Shorter than every block: all become the length rounded up to 8.
  short = bs.clipped(100, 1000)
  assert (short.block_q, short.block_q_dkv, short.block_q_dq, short.q_multiple) == (
      104, 104, 104, 104)
  # Between blocks: the long ones take the longest block that fits, no new lcm factor.
  assert (short.block_k, short.block_k_dkv, short.block_k_dq) == (512, 128, 256)
  mid = tpu.BlockSizes().clipped(300, 300)
  assert (mid.block_q, mid.block_q_dkv, mid.block_q_dq, mid.q_multiple) == (256, 256, 256, 256)
  assert tpu.head_dim_multiple(64) == 1


def test_skipped_blocks_reuse_a_fetched_block():
  """Grid steps of SKIP blocks repeat the block index of the step before: no DMA."""
  batch, length, block = 2, 128, 16
  seg = np.ones((batch, length), np.int32)
  seg[:, 50:] = 2
  seg[1, 100:] = 3
  # Positions restart per segment, so block_classes keeps PARTIAL blocks past
  # SKIP ones in a row: the live blocks of a row are not one range.
  pos = np.concatenate([np.arange(50), np.arange(length - 50)])[None].repeat(batch, 0)
  aux = tiles.Aux(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(seg))
  spec = tiles.Spec(causal=True, scale=1.0, groups=1, has_segments=True, has_prefix=False,
                    has_alibi=False, has_t5=False)
  n = length // block
  cls = np.asarray(tiles.block_classes(spec, aux, block, block))
  table = tpu._tables(spec, aux, block, block)
  holes = 0
  for b in range(batch):
    for i in range(n):
      steps = [tpu._lookup(spec, n, n, b, i, j, table) for j in range(n)]
      assert [int(c) for c, _ in steps] == list(cls[b, i])
      fetched = np.asarray([int(f) for _, f in steps])
      live = np.nonzero(cls[b, i] != tiles.SKIP)[0]
      assert (fetched[live] == live).all()
      # The block index changes only to bring in the next live block.
      assert 1 + (np.diff(fetched) != 0).sum() == max(len(live), 1)
      holes += len(live) and live[-1] - live[0] + 1 > len(live)
  assert holes  # the case has SKIP blocks between live ones
