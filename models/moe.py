"""Mixture-of-experts feed-forward block: a drop-in for `layers.MlpBlock`.

Routers (`cfg.RouterKind`):
  token_choice   every token picks its top-k experts (k = 1 Switch, 2 GLaM/Mixtral);
  expert_choice  every expert picks its top-`capacity` tokens of a sequence
                 (Zhou et al., 2022): each expert is exactly full;
  hash           a fixed hash of the token id picks one expert (PanGu-Sigma's
                 random routing, Roller et al.'s hash layers): no router weights.
                 Its router logits are fixed: 0 for that expert, -inf for the
                 others (probability exactly 1 and 0), so it runs as top-1.
Execution (`cfg.MoeImpl`):
  capacity    Switch/GShard dispatch: per sequence, each expert takes at most
              `capacity` = ceil(k * length * capacity_factor / experts) tokens
              (first choices before second choices, earlier tokens first); the
              rest are dropped (their expert output is 0). XLA top-k, dense
              einsums.
  dropless    every choice is computed (`moe_routing.routing_ops.moe_dropless`):
              the Pallas top-k gating kernel, tokens sorted by expert, the
              Pallas grouped matmul (`moe_routing.gmm_ops`), un-sorted.
  ragged_dot  the same with XLA's top-k and `jax.lax.ragged_dot`.
Shared experts (DeepSeek) are a dense MLP every token also goes through.

Router statistics are sown into the `moe` collection (one entry per MoE
layer): `load_balance_loss` (Switch: experts * sum_e f_e P_e), `router_z_loss`
(ST-MoE: mean logsumexp^2), `dropped_fraction` and `expert_load` (the largest
f_e * experts; 1.0 is perfect balance). The model adds the weighted losses.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import config as cfg
from models import layers
from pallas_kernels.moe_routing import routing_ops
from pallas_kernels.moe_routing import xla as xla_routing
from partitioning import axes as ax
from partitioning import partitioner

Array = jax.Array

MOE_COLLECTION = 'moe'
_ACTIVATIONS = {kind: layers.activation(kind) for kind in cfg.MlpKind}


def expert_capacity(length: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert per sequence: ceil(k * length * factor / experts), at most length."""
  return max(1, min(length, math.ceil(k * length * capacity_factor / num_experts)))


def hash_experts(token_ids: Array, num_experts: int) -> Array:
  """A fixed pseudo-random expert per token id (Knuth's multiplicative hash)."""
  h = token_ids.astype(jnp.uint32) * jnp.uint32(2654435761)
  return ((h >> 16) % jnp.uint32(num_experts)).astype(jnp.int32)


def collect_stats(collection) -> dict:
  """The sown `moe` collection -> name -> [num_moe_layers] f32, in layer order.

  Scanned stacks sow one [num_scanned] array per MoE position of the scan unit;
  unrolled stacks one scalar per layer. Flax keeps module names in call order
  within a scope, so walking the tree in insertion order is layer order, with
  the encoder (called first) before the decoder.
  """
  out = {}

  def walk(tree):
    for key, value in tree.items():
      if isinstance(value, tuple):  # sow's container
        out.setdefault(key, []).extend(jnp.atleast_1d(v) for v in value)
      else:
        walk(value)
  walk(collection)
  return {k: jnp.concatenate(v) for k, v in out.items()}


def expert_choice_dispatch(probs: Array, capacity: int):
  """Each expert's top-`capacity` tokens of each sequence (Zhou et al., 2022).

  Args:
    probs: [batch, length, expert] router probabilities.
    capacity: tokens per expert per sequence (<= length).

  Returns:
    dispatch [batch, expert, capacity, length] one-hot f32 (every expert
    exactly full, with distinct tokens) and gates [batch, expert, capacity].
  """
  gates, idx = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)
  return _one_hot(idx, probs.shape[1], jnp.float32), gates


def _one_hot(idx, n, dtype):
  return jax.nn.one_hot(idx, n, dtype=dtype)


class MoeBlock(nn.Module):
  """[batch, length, embed] -> [batch, length, embed] through routed experts.

  Parameters: router/kernel [embed, expert] (absent for hash routing);
  expert weights wi_0, wi_1 [expert, embed, mlp] (gated kinds) or wi, and
  wo [expert, mlp, embed]; shared_mlp (a `layers.MlpBlock`) when
  num_shared_experts > 0.
  """
  num_experts: int
  num_selected: int
  mlp_dim: int
  kind: cfg.MlpKind = cfg.MlpKind.SWIGLU
  router: cfg.RouterKind = cfg.RouterKind.TOKEN_CHOICE
  impl: cfg.MoeImpl = cfg.MoeImpl.CAPACITY
  capacity_factor: float = 1.25
  renormalize: bool = True
  router_jitter: float = 0.0
  num_shared_experts: int = 0
  use_bias: bool = False
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_scale: float = 1.0
  gelu_approximate: bool = True  # tanh GELU; False: exact (erf)
  # LoRA/IA3 on the shared experts' dense layers; with a quantized base (QLoRA) the
  # experts' weights are stored quantized, each expert's matrix on its own.
  peft: Optional[cfg.PeftConfig] = None

  def _expert_weights(self, emb: int):
    def init(key, shape, dtype):
      # Each expert is initialised like a dense layer of fan-in shape[1].
      keys = jax.random.split(key, shape[0])
      one = lambda k: layers.default_kernel_init(k, shape[1:], dtype) * self.init_scale
      return jax.vmap(one)(keys).astype(dtype)
    quant = layers.base_quantization(self.peft)

    def param(name, shape, names):
      if quant is not None:
        w = layers.quantized_param(self, name, init, shape, quant, lead_axes=names[:1])
      else:
        w = self.param(name, nn.with_logical_partitioning(init, names), shape, self.param_dtype)
      return jnp.asarray(w, self.dtype)
    e, m = self.num_experts, self.mlp_dim
    names_in, names_out = (ax.EXPERT, ax.EMBED, ax.MLP), (ax.EXPERT, ax.MLP, ax.EMBED)
    if self.kind.gated:
      wi = (param('wi_0', (e, emb, m), names_in), param('wi_1', (e, emb, m), names_in))
    else:
      wi = (param('wi', (e, emb, m), names_in),)
    return wi, param('wo', (e, m, emb), names_out)

  def _router_logits(self, x: Array) -> Array:
    """[batch, length, expert] f32; computed in f32 for stable softmax (Switch)."""
    x = x.astype(jnp.float32)
    if self.router_jitter > 0.0 and not self.deterministic:
      noise = jax.random.uniform(self.make_rng('dropout'), x.shape, jnp.float32,
                                 1.0 - self.router_jitter, 1.0 + self.router_jitter)
      x = x * noise
    kernel = self.param('router', nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'),
        (ax.EMBED, ax.EXPERT)), (x.shape[-1], self.num_experts), self.param_dtype)
    logits = jnp.einsum('bld,de->ble', x, jnp.asarray(kernel, jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return nn.with_logical_constraint(logits, (ax.BATCH, ax.LENGTH, ax.EXPERT))

  @nn.compact
  def __call__(self, x: Array, token_ids: Optional[Array] = None) -> Array:
    batch, length, emb = x.shape
    e, k = self.num_experts, self.num_selected
    wi, wo = self._expert_weights(emb)
    act = layers.activation(self.kind, self.gelu_approximate)
    x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.EMBED))

    if self.router == cfg.RouterKind.HASH:
      if token_ids is None:
        raise ValueError('hash routing needs the token ids: pass token_ids')
      # Fixed logits: probability exactly 1 for the hashed expert, so top-1
      # picks it with gate 1, and the z-loss is exactly 0.
      logits = jnp.log(_one_hot(hash_experts(token_ids, e), e, jnp.float32))
      k = 1
    else:
      logits = self._router_logits(x)  # [batch, length, expert]
    probs = jax.nn.softmax(logits, axis=-1)
    z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)

    if self.router == cfg.RouterKind.EXPERT_CHOICE:
      out, stats = self._expert_choice(x, probs, wi, wo, act)
    else:
      if self.impl == cfg.MoeImpl.CAPACITY:
        weights, experts = xla_routing.top_k_gating(logits.reshape(-1, e), k, self.renormalize)
        weights, experts = weights.reshape(batch, length, k), experts.reshape(batch, length, k)
        out, dropped = self._capacity(x, weights, experts, wi, wo, act)
      else:
        (out, experts), dropped = self._dropless(x, logits, k, wi, wo, act), jnp.zeros(())
      chosen = _one_hot(experts, e, jnp.float32).sum(axis=2)  # [batch, length, expert]
      fraction = jnp.mean(chosen, axis=(0, 1)) / experts.shape[-1]  # f_e, sums to 1
      stats = dict(load_balance_loss=e * jnp.sum(fraction * jnp.mean(probs, axis=(0, 1))),
                   expert_load=jnp.max(fraction) * e, dropped_fraction=dropped)
    stats['router_z_loss'] = z_loss
    if self.router == cfg.RouterKind.HASH:
      stats['load_balance_loss'] = jnp.zeros((), jnp.float32)  # fixed routing: nothing to learn
    for name, value in stats.items():
      self.sow(MOE_COLLECTION, name, jnp.asarray(value, jnp.float32))

    if self.num_shared_experts:
      out = out + layers.MlpBlock(
          self.mlp_dim * self.num_shared_experts, self.kind, use_bias=self.use_bias,
          deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype,
          init_scale=self.init_scale, gelu_approximate=self.gelu_approximate,
          peft=self.peft, name='shared_mlp')(x)
    return nn.with_logical_constraint(out.astype(self.dtype), (ax.BATCH, ax.LENGTH, ax.EMBED))

  # --- execution ------------------------------------------------------------------------
  def _capacity(self, x, weights, experts, wi, wo, act):
    """Switch/GShard dispatch with a per-sequence capacity; returns (out, dropped fraction)."""
    batch, length, emb = x.shape
    e, k = self.num_experts, experts.shape[-1]
    cap = expert_capacity(length, k, e, self.capacity_factor)
    mask = _one_hot(experts, e, jnp.int32)  # [batch, length, k, expert]
    # Slot of each choice in its expert's buffer: first choices of every token
    # come before second choices (GShard's priority), then token order.
    by_choice = jnp.swapaxes(mask, 1, 2).reshape(batch, k * length, e)
    slot = jnp.cumsum(by_choice, axis=1) - 1
    slot = jnp.swapaxes(slot.reshape(batch, k, length, e), 1, 2)  # [batch, length, k, expert]
    keep = mask * (slot < cap)
    slot_1h = _one_hot(jnp.sum(slot * keep, axis=-1), cap, jnp.float32)  # [b, l, k, cap]
    keep_any = jnp.sum(keep, axis=-1).astype(jnp.float32)  # [batch, length, k]
    dispatch = jnp.einsum('blke,blkc->blec', keep.astype(jnp.float32),
                          slot_1h * keep_any[..., None])  # [batch, length, expert, cap]
    combine = jnp.einsum('blke,blkc->blec', keep.astype(jnp.float32),
                         slot_1h * (keep_any * weights)[..., None])
    dropped = 1.0 - jnp.sum(keep) / jnp.maximum(jnp.sum(mask), 1)
    return self._run_slots(x, dispatch, combine, wi, wo, act), dropped

  def _expert_choice(self, x, probs, wi, wo, act):
    """Each expert takes its top-`capacity` tokens of each sequence by router probability."""
    length = x.shape[1]
    cap = expert_capacity(length, self.num_selected, self.num_experts, self.capacity_factor)
    dispatch, gates = expert_choice_dispatch(probs, cap)  # [batch, expert, cap, length]
    dispatch = jnp.transpose(dispatch, (0, 3, 1, 2))  # [batch, length, expert, cap]
    combine = dispatch * gates[:, None]
    out = self._run_slots(x, dispatch, combine, wi, wo, act)
    chosen = jnp.sum(dispatch, axis=(2, 3))  # [batch, length]: experts per token
    stats = dict(load_balance_loss=jnp.zeros((), jnp.float32),  # balanced by construction
                 expert_load=jnp.ones((), jnp.float32),
                 dropped_fraction=jnp.mean((chosen == 0).astype(jnp.float32)))
    return out, stats

  def _run_slots(self, x, dispatch, combine, wi, wo, act):
    """Experts over fixed slots: dispatch/combine [batch, length, expert, cap].

    Without an expert mesh axis the einsums are left to XLA's partitioner.
    With one, each device builds its tokens' slots for every expert and one
    all-to-all over the expert axis brings each expert's slots to the device
    holding that expert (GShard); a second all-to-all brings the outputs back.
    """
    ep, batch_axes, mlp_axis = _expert_parallelism(x.shape, wi[0].shape)
    dtype = self.dtype
    if not ep:
      h = jnp.einsum('blec,bld->ebcd', dispatch.astype(dtype), x)  # [expert, b, cap, embed]
      h = nn.with_logical_constraint(h, (ax.EXPERT, ax.BATCH, None, ax.EMBED))
      y = _experts_on_slots(h, wi, wo, act)
      y = nn.with_logical_constraint(y, (ax.EXPERT, ax.BATCH, None, ax.EMBED))
      return jnp.einsum('blec,ebcd->bld', combine.astype(dtype), y)

    def local(x, dispatch, combine, wi, wo):
      h = jnp.einsum('blec,bld->ebcd', dispatch.astype(dtype), x)  # [expert, b_local, cap, d]
      h = jax.lax.all_to_all(h, ax.EXPERT_AXIS, 0, 1, tiled=True)  # [expert/ep, b*ep, cap, d]
      y = _experts_on_slots(h, wi, wo, act)
      if mlp_axis is not None:  # the mlp dim is split: partial sums
        y = jax.lax.psum(y, mlp_axis)
      y = jax.lax.all_to_all(y, ax.EXPERT_AXIS, 1, 0, tiled=True)  # [expert, b_local, cap, d]
      return jnp.einsum('blec,ebcd->bld', combine.astype(dtype), y)

    P = jax.sharding.PartitionSpec
    rows, slots = P(batch_axes, None, None), P(batch_axes, None, None, None)
    w_in, w_out = P(ax.EXPERT_AXIS, None, mlp_axis), P(ax.EXPERT_AXIS, mlp_axis, None)
    return jax.shard_map(local, in_specs=(rows, slots, slots, (w_in,) * len(wi), w_out),
                         out_specs=rows, check_vma=False)(x, dispatch, combine, wi, wo)

  def _dropless(self, x, logits, k, wi, wo, act):
    """Every choice computed: `routing_ops.moe_dropless` -> (out, experts [batch, length, k]).

    Under a mesh with an expert axis (and always for the Pallas kernels, which
    have no partitioning rule) it runs per device in shard_map: each device
    gathers the tokens and router logits of its expert group, gates them (a
    cheap [tokens, experts] pass, rather than gathering the gates), runs only
    its own experts, and a reduce-scatter returns every token's sum to the
    device that holds it.
    """
    batch, length, emb = x.shape
    e = self.num_experts
    pallas = _runs_pallas(self.impl)
    ep, batch_axes, mlp_axis = _expert_parallelism(x.shape, wi[0].shape, always=pallas)
    dropless = functools.partial(routing_ops.moe_dropless, k=k, renormalize=self.renormalize,
                                 activation=act, gated=len(wi) == 2, pallas=pallas)

    def run(x, logits, wi, wo, first_expert=None):
      out, _, experts = dropless(x.reshape(-1, emb).astype(self.dtype), logits.reshape(-1, e),
                                 wi, wo, first_expert=first_expert)
      if mlp_axis is not None:  # the mlp dim is split: partial sums
        out = jax.lax.psum(out, mlp_axis)
      return out, experts  # [tokens, embed], [tokens, k]

    if not ep:
      out, experts = run(x, logits, wi, wo)
      return out.reshape(batch, length, emb), experts.reshape(batch, length, k)

    def local(x, logits, wi, wo):
      b_local = x.shape[0]
      gather = lambda a: jax.lax.all_gather(a, ax.EXPERT_AXIS, axis=0, tiled=True)
      i = jax.lax.axis_index(ax.EXPERT_AXIS)
      out, experts = run(gather(x), gather(logits), wi, wo, i * (e // ep))
      out = jax.lax.psum_scatter(out, ax.EXPERT_AXIS, scatter_dimension=0, tiled=True)
      mine = jax.lax.dynamic_slice_in_dim(experts, i * b_local * length, b_local * length)
      return out.reshape(b_local, length, emb), mine.reshape(b_local, length, k)

    P = jax.sharding.PartitionSpec
    rows = P(batch_axes, None, None)
    w_in, w_out = P(ax.EXPERT_AXIS, None, mlp_axis), P(ax.EXPERT_AXIS, mlp_axis, None)
    return jax.shard_map(local, in_specs=(rows, rows, (w_in,) * len(wi), w_out),
                         out_specs=(rows, rows), check_vma=False)(x, logits, wi, wo)


def _experts_on_slots(h: Array, wi, wo, act) -> Array:
  """h [expert, batch, cap, embed] through each expert's MLP -> same shape."""
  a = act(jnp.einsum('ebcd,edm->ebcm', h, wi[0]))
  if len(wi) == 2:
    a = a * jnp.einsum('ebcd,edm->ebcm', h, wi[1])
  return jnp.einsum('ebcm,emd->ebcd', a, wo)


def _expert_parallelism(x_shape, wi_shape, always: bool = False):
  """(expert-axis size, mesh axes of the batch, mesh axis of the mlp dim) in scope.

  Size 0 means: no shard_map, XLA partitions the computation itself. That is
  the case without a mesh, and with an expert axis of 1 unless `always` (the
  Pallas grouped matmul has no partitioning rule, so it always runs per device).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or (
      not always and dict(mesh.shape).get(ax.EXPERT_AXIS, 1) == 1):
    return 0, None, None
  batch_axes = partitioner.mesh_axes_in_context((ax.BATCH, ax.LENGTH, ax.EMBED), x_shape)[0]
  mlp_axis = partitioner.mesh_axes_in_context((ax.EXPERT, ax.EMBED, ax.MLP), wi_shape)[2]
  return dict(mesh.shape)[ax.EXPERT_AXIS], batch_axes, mlp_axis


def _runs_pallas(impl: cfg.MoeImpl) -> bool:
  """Whether a dropless impl runs the Pallas kernels (gating, grouped matmul) or XLA's."""
  match impl:
    case cfg.MoeImpl.RAGGED_DOT:
      return False  # XLA's top_k and jax.lax.ragged_dot
    case cfg.MoeImpl.DROPLESS:
      return True  # interpreted on CPU
  raise NotImplementedError(impl)
