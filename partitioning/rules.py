"""The logical-axis rule table: logical names -> mesh axes."""

from typing import Optional, Sequence, Tuple, Union

from partitioning import axes as ax

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Tuple[Tuple[str, MeshAxes], ...]


def standard_rules(fsdp: bool = True,
                   tensor: bool = True,
                   sequence: bool = False,
                   extra: Optional[Sequence[Tuple[str, MeshAxes]]] = None) -> Rules:
  """Builds the rule table from a few switches.

  Rules are applied by Flax in order, and a mesh axis is used at most once per
  array, so `batch` (listed first) takes `fsdp` for activations while parameters,
  which have no batch dimension, shard `embed` over `fsdp`.

  Args:
    fsdp: shard parameters and optimizer state along `embed` over the `fsdp` axis.
    tensor: shard heads, kv_heads, mlp and vocab over the `tensor` axis.
    sequence: reserved for sequence (context) parallelism; not supported yet.
    extra: rules placed before the standard ones (they take precedence).

  Returns:
    A tuple of (logical name, mesh axes) pairs covering every logical name.
  """
  if sequence:
    raise ValueError('sequence parallelism is not supported yet: set '
                     'standard_rules.sequence = False')
  tensor_axis = ax.TENSOR if tensor else None
  rules = [
      # Experts claim the expert mesh axis first; everywhere else the batch
      # is split over it too (expert parallelism doubles as data parallelism),
      # and falls back to (data, fsdp) in arrays that also have an expert dim.
      (ax.EXPERT, ax.EXPERT_AXIS),
      (ax.BATCH, (ax.DATA, ax.FSDP, ax.EXPERT_AXIS)),
      (ax.BATCH, (ax.DATA, ax.FSDP)),
      (ax.EMBED, ax.FSDP if fsdp else None),
      (ax.VOCAB, tensor_axis),
      (ax.MLP, tensor_axis),
      (ax.HEADS, tensor_axis),
      (ax.KV_HEADS, tensor_axis),
      (ax.HEAD_DIM, None),
      (ax.LENGTH, None),
      (ax.LAYERS, None),
      (ax.RELPOS_BUCKETS, None),
      (ax.ABSPOS, None),
      (ax.ADAPTER, None),  # small: replicated
      (ax.QUANTIZED, None),  # flat 4/8-bit blocks: replicated (any length)
  ]
  return tuple(extra or ()) + tuple(rules)
