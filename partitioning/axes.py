"""Logical axis names: the only place these strings appear.

Every parameter and key activation names its dimensions with these constants;
`partitioning.rules` maps them onto mesh axes. Use them as
`from partitioning import axes as ax`.
"""

BATCH = 'batch'  # examples in a batch (activations only)
LENGTH = 'length'  # sequence positions of activations (queries and keys)
EMBED = 'embed'  # model (residual stream) width
MLP = 'mlp'  # hidden width of the feed-forward block
HEADS = 'heads'  # query heads
KV_HEADS = 'kv_heads'  # key/value heads (fewer than HEADS for MQA/GQA)
HEAD_DIM = 'head_dim'  # width of one attention head
VOCAB = 'vocab'  # token vocabulary
LAYERS = 'layers'  # the stacked-layer axis that nn.scan adds to parameters
RELPOS_BUCKETS = 'relpos_buckets'  # T5 relative-position buckets
ABSPOS = 'abspos'  # rows of a learned absolute position table
EXPERT = 'expert'  # mixture-of-experts experts
ADAPTER = 'adapter'  # fine-tuning's small dims: LoRA rank, adapter bottleneck, virtual tokens
QUANTIZED = 'quantized'  # the flat blocks of a quantized frozen kernel (QLoRA)

LOGICAL = (BATCH, LENGTH, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS,
           RELPOS_BUCKETS, ABSPOS, EXPERT, ADAPTER, QUANTIZED)

# Mesh axes (physical): what the logical names above are mapped onto.
DATA = 'data'  # pure data parallelism: batch split, parameters replicated
FSDP = 'fsdp'  # ZeRO-3: batch split and parameters/optimizer state sharded
TENSOR = 'tensor'  # Megatron-style tensor parallelism of heads, mlp and vocab
EXPERT_AXIS = 'expert'  # expert parallelism: experts split, tokens exchanged all-to-all
MESH_AXES = (DATA, FSDP, TENSOR, EXPERT_AXIS)
