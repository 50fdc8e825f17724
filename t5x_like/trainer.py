"""The training state, a pure train step, and its sharded compilation.

`train_step(state, batch) -> (state, metrics)` is a pure function: gradient
accumulation over microbatches (f32 sums, normalised once by the global
number of target tokens, so accumulated, sharded and single-device steps
compute the same update), then the optax update. `Trainer` builds the state's
shardings from the model's logical axis names and jits the step with them.
"""

import concurrent.futures
import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import metrics as metrics_lib
from models import model as model_lib
from models import peft
from partitioning import axes as ax
from partitioning import partitioner as partitioner_lib
from t5x_like import checkpoints
from t5x_like import optimizers
from t5x_like import utils
from t5x_like import xla_env

Array = jax.Array
@flax.struct.dataclass
class TrainState:
  step: Array  # int32 scalar
  params: Any
  opt_state: Any


def _sum_tree(a, b):
  return jax.tree.map(jnp.add, a, b)


def first_token_groups(batch: Mapping[str, Array], groups: Mapping[str, int]) -> Dict[str, Array]:
  """Masks over the targets of the examples whose input starts with each group's token.

  With UL2-style mode tokens this splits the loss by denoiser family. The
  input is the encoder's (encoder-decoder) or the decoder's own sequence
  (decoder-only: the prefix comes first); packed rows are split by segment.

  Args:
    batch: model features, packed (segment ids and positions) or not.
    groups: name -> the token id that starts that group's inputs.

  Returns:
    name -> [batch, target length] float32 0/1 masks.
  """
  if 'encoder_input_tokens' in batch:
    src = batch['encoder_input_tokens']
    src_seg, src_pos = batch.get('encoder_segment_ids'), batch.get('encoder_positions')
  else:
    src = batch['decoder_target_tokens']
    src_seg, src_pos = batch.get('decoder_segment_ids'), batch.get('decoder_positions')
  tgt_seg = batch.get('decoder_segment_ids')
  if src_pos is None:
    first = jnp.broadcast_to(jnp.arange(src.shape[1]) == 0, src.shape)
  else:
    first = src_pos == 0
  if src_seg is None or tgt_seg is None:
    src_seg = jnp.ones(src.shape, jnp.int32)
    tgt_seg = jnp.ones(batch['decoder_target_tokens'].shape, jnp.int32)
  same_segment = tgt_seg[:, :, None] == src_seg[:, None, :]  # [batch, target len, input len]
  out = {}
  for name, token in groups.items():
    start = jnp.logical_and(first, src == token)  # [batch, input len]
    out[name] = jnp.any(jnp.logical_and(same_segment, start[:, None, :]), axis=-1).astype(
        jnp.float32)
  return out


def eval_metrics(model: model_lib.BaseModel, params, batch: Mapping[str, Array],
                 token_groups: Optional[Mapping[str, Array]] = None) -> metrics_lib.Metrics:
  """The model's metrics on one batch, `loss` being the cross-entropy alone
  (z-loss and router losses are regularisers, not part of the likelihood)."""
  _, metrics = model.loss_fn(params, batch, None, token_groups)
  if 'cross_entropy' in metrics:  # (a preference model's loss has no likelihood part)
    metrics['loss'] = metrics['cross_entropy'].replace(console=metrics['loss'].console)
  return metrics


class Trainer:
  """Owns the model, optimizer and partitioner; compiles train and eval steps.

  Args:
    model: a `models.model.BaseModel`.
    optimizer: an `optimizers.Optimizer`.
    partitioner: the mesh and rule table.
    batch_shapes: the global batch's features and shapes, e.g. from
      `pipeline.batch_shapes` or `model.feature_shapes`.
    num_microbatches: gradient accumulation steps per train step.
    seed: seeds parameter init and dropout (dropout key = fold_in(seed, step)).
    loss_groups: name -> first input token (e.g. UL2 mode tokens): the
      cross-entropy of each group's examples is reported as metric `loss/<name>`.
    trainable_params: a regular expression searched in each parameter's
      '/'-joined path (e.g. 'lora_|decoder_norm'): only those parameters get
      gradients and optimizer state, the rest stay bit-identical. None: the
      model's PEFT method's parameters (`models.peft.trainable_pattern`), or
      every parameter without one.
    split_update: run a step as two compiled programs, the gradient
      (`grad_step`) and the optimizer update (`update_step`), instead of one
      (`train_step`); the values are the same. None: split on the CPU backend,
      where one program materialises every scalar the optimizer broadcasts
      (learning rate, betas, bias corrections, clip factor) as a parameter-sized
      buffer, scheduled at the start and kept through the backward pass, and
      where the update runs without the YNN elementwise fusions
      (`xla_env.elementwise_compiler_options`): measured on the 20.5M comparison
      model at 8 x 512, the step's temporary memory falls from 838 MB to 507 MB
      (+ 82 MB of gradients between the programs) and the update takes 0.08 s
      instead of 0.14 s (docs/efficiency.md). On GPU and TPU one program lets
      XLA overlap the update with the backward pass.
  """

  def __init__(self, model: model_lib.BaseModel, optimizer: optimizers.Optimizer,
               partitioner: partitioner_lib.Partitioner,
               batch_shapes: Mapping[str, Tuple[int, ...]], num_microbatches: int = 1,
               seed: int = 0, loss_groups: Optional[Mapping[str, int]] = None,
               trainable_params: Optional[str] = None, split_update: Optional[bool] = None):
    self.model = model
    platform = jax.devices()[0].platform
    self.split_update = platform == 'cpu' if split_update is None else split_update
    # XLA options of the elementwise programs: the initialisation and the split update.
    self._elementwise_options = xla_env.elementwise_compiler_options(platform) or None
    self.trainable_pattern = (trainable_params if trainable_params is not None else
                              model.trainable_pattern())
    self.loss_groups = dict(loss_groups or {})
    self.optimizer = optimizer
    self.partitioner = partitioner
    self.batch_shapes = {k: tuple(v) for k, v in batch_shapes.items()}
    batch_size = self.batch_size = next(iter(self.batch_shapes.values()))[0]
    self.num_microbatches = num_microbatches
    self.seed = seed
    partitioner.check_batch_size(batch_size)
    partitioner.check_experts(model.config.num_experts)
    if num_microbatches < 1 or batch_size % num_microbatches:
      raise partitioner_lib.BatchError(
          f'batch size {batch_size} is not divisible by num_microbatches={num_microbatches}: '
          'change train.num_microbatches')
    micro = batch_size // num_microbatches
    if micro % partitioner.data_parallel_size:
      raise partitioner_lib.BatchError(
          f'microbatch size {micro} (batch {batch_size} / {num_microbatches} microbatches) is '
          f'not divisible by the data-parallel size {partitioner.data_parallel_size}: '
          'change train.num_microbatches or train.batch_size')
    self._dummy = {k: np.zeros(v, np.int32) for k, v in self.batch_shapes.items()}
    self.batch_shardings = {k: partitioner.batch_sharding(v.ndim) for k, v in self._dummy.items()}
    self._build_abstract_state()
    self._jit_init = None
    self._precompiled_for = None  # (the batch shapes and dtypes precompile_train_step compiled for)
    self._jit_train_step = None
    self._jit_eval_step = None

  # --- state --------------------------------------------------------------------
  def _init_params_boxed(self, rng):
    return self.model.init_variables(rng, self._dummy)['params']

  def _build_abstract_state(self):
    p = self.partitioner
    with p.context():
      boxed = jax.eval_shape(self._init_params_boxed, jax.random.PRNGKey(0))
    self.param_logical_specs = nn.get_partition_spec(boxed)
    param_shardings = p.boxed_shardings(boxed)
    abstract_params = nn.unbox(boxed)
    self._check_trainable(abstract_params)
    trainable_abstract = self.trainable(abstract_params)
    abstract_opt = jax.eval_shape(self.optimizer.tx.init, trainable_abstract)
    opt_shardings = p.derived_shardings(abstract_opt, trainable_abstract,
                                        self.trainable(param_shardings))
    self.state_shardings = TrainState(step=p.replicated(), params=param_shardings,
                                      opt_state=opt_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
        self.state_shardings)

  @property
  def num_params(self) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract_state.params)))

  @property
  def num_trainable_params(self) -> int:
    return int(sum(np.prod(x.shape) for x in
                   jax.tree.leaves(self.trainable(self.abstract_state.params))))

  def _check_trainable(self, abstract_params) -> None:
    mask = peft.mask(abstract_params, self.trainable_pattern)
    self.partial = not all(mask.values())
    if not any(mask.values()):
      names = sorted({k.rsplit('/', 1)[-1] for k in mask})
      raise utils.InputError(
          f'train.trainable_params={self.trainable_pattern!r} matches no parameter (their '
          f'names: {", ".join(names)}): set it to a pattern of parameter paths, or None')

  def trainable(self, params):
    """The trained part of a parameter tree (all of it without a partition)."""
    return peft.split(params, self.trainable_pattern)[0] if self.partial else params

  def frozen(self, params):
    """The frozen part of a parameter tree (empty without a partition)."""
    return peft.split(params, self.trainable_pattern)[1] if self.partial else {}

  def combine(self, trainable, frozen):
    return peft.combine(trainable, frozen) if self.partial else trainable

  def init_state(self) -> TrainState:
    """Initialises directly into the sharded layout (no full copy on one device)."""
    if self._jit_init is None:
      def init(rng):
        params = nn.unbox(self._init_params_boxed(rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.optimizer.tx.init(self.trainable(params)))
      # (Elementwise random draws: compiled with the update's options, faster to
      # compile and to run on CPU; xla_env.elementwise_compiler_options.)
      self._jit_init = jax.jit(init, out_shardings=self.state_shardings,
                               compiler_options=self._elementwise_options)
    with self.partitioner.context():
      return self._jit_init(jax.random.PRNGKey(self.seed))

  # --- steps --------------------------------------------------------------------
  def _token_groups(self, batch):
    return first_token_groups(batch, self.loss_groups) if self.loss_groups else None

  def _grads(self, params, batch, rng, frozen=None) -> Tuple[Any, Array, metrics_lib.Metrics]:
    """Summed grads (of `params`, the trained part when `frozen` is given), loss sum
    and merged metrics over the microbatches of `batch`."""
    dropout = self.model.needs_rng

    def loss_fn(p, mb, key, groups):
      # Differentiated in the trained parameters only: no gradient of a frozen one is formed.
      return self.model.loss_fn(p if frozen is None else self.combine(p, frozen), mb, key,
                                groups)

    def one(mb, i):
      key = jax.random.fold_in(rng, i) if dropout else None
      (loss_sum, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, mb, key, self._token_groups(mb))
      grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
      return grads, loss_sum, metrics

    m = self.num_microbatches
    if m == 1:
      return one(batch, 0)
    micro = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)
    micro = jax.tree.map(lambda x: nn.with_logical_constraint(
        x, (None, ax.BATCH) + (None,) * (x.ndim - 2)), micro)

    def body(carry, xs):
      grads, loss_sum, metrics = carry
      mb, i = xs
      g, l, m_ = one(mb, i)
      return (_sum_tree(grads, g), loss_sum + l, metrics_lib.merge(metrics, m_)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: one(
        jax.tree.map(lambda x: x[0], micro), 0)))
    (grads, loss_sum, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(m)))
    return grads, loss_sum, metrics

  def train_step(self, state: TrainState, batch: Mapping[str, Array]
                 ) -> Tuple[TrainState, metrics_lib.Metrics]:
    """One optimizer step on a global batch. Pure: jit it, shard it, test it.

    The gradient is the loss sum's, divided by the global number of target
    tokens (`metrics['loss'].weight`), so accumulation and sharding do not
    change the update. It is `update_step(state, *grad_step(state, batch))`,
    which `jit_train_step` runs as one program or two (`split_update`).
    """
    return self.update_step(state, *self.grad_step(state, batch))

  def grad_step(self, state: TrainState, batch: Mapping[str, Array]
                ) -> Tuple[Any, metrics_lib.Metrics]:
    """The trained parameters' gradient of the mean token loss, and the batch's metrics."""
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)
    trained, frozen = self.trainable(state.params), self.frozen(state.params)
    grads, _, metrics = self._grads(trained, batch, rng, frozen if self.partial else None)
    denom = jnp.maximum(metrics['loss'].weight, 1.0)
    return jax.tree.map(lambda g: g / denom, grads), metrics

  def update_step(self, state: TrainState, grads, metrics: metrics_lib.Metrics
                  ) -> Tuple[TrainState, metrics_lib.Metrics]:
    """The optimizer's update of `state` by `grads`; adds the update's metrics."""
    trained, frozen = self.trainable(state.params), self.frozen(state.params)
    updates, opt_state = self.optimizer.tx.update(grads, state.opt_state, trained)
    trained = optax.apply_updates(trained, updates)
    # Frozen parameters pass through untouched (aliased to the donated input).
    params = self.combine(trained, frozen)
    # One fused reduction over the new state: a NaN or infinity in the parameters
    # or the optimizer state (e.g. from an overflowing update, with a finite loss)
    # stops the run before that state can be checkpointed. (Frozen ones cannot change.)
    finite = checkpoints.all_finite((trained, opt_state))
    metrics = dict(metrics)
    metrics.update(
        nonfinite_state=metrics_lib.Last(1.0 - finite.astype(jnp.float32)),
        grad_norm=metrics_lib.Last(optax.tree.norm(grads)),
        learning_rate=metrics_lib.Last(
            jnp.asarray(self.optimizer.learning_rate(state.step), jnp.float32), console='.2e'))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(self, params, batch: Mapping[str, Array]) -> metrics_lib.Metrics:
    """The model's metrics on one batch; merge batches with `metrics.merge`.

    The reported `loss` is the cross-entropy alone: z-loss and router losses
    are regularisers, not part of the likelihood.
    """
    return eval_metrics(self.model, params, batch, self._token_groups(batch))

  def evaluate(self, params, batches) -> metrics_lib.Metrics:
    """`eval_step` merged over host-local batches (numpy), still on device."""
    total = None
    for b in batches:
      m = self.jit_eval_step(params, self.shard_batch(b))
      total = m if total is None else metrics_lib.merge(total, m)
    return total

  @property
  def jit_train_step(self):
    """`train_step`, compiled and sharded: (state, batch) -> (state, metrics); the
    state is donated."""
    if self._jit_train_step is None:
      programs = self._train_programs
      if len(programs) == 1:
        step = programs[0]
      else:
        grad_program, update_program = programs

        def step(state, batch):
          grads, metrics = grad_program(state, batch)
          return update_program(state, grads, metrics)
      self._jit_train_step = self._in_context(step)
    return self._jit_train_step

  @functools.cached_property
  def _train_programs(self):
    """The jitted programs of a step: (train_step,) or (grad_step, update_step)."""
    replicated = self.partitioner.replicated()
    if not self.split_update:
      return (jax.jit(self.train_step,
                      in_shardings=(self.state_shardings, self.batch_shardings),
                      out_shardings=(self.state_shardings, replicated), donate_argnums=(0,)),)
    grad_shardings = self.trainable(self.state_shardings.params)
    grad_program = jax.jit(self.grad_step,
                           in_shardings=(self.state_shardings, self.batch_shardings),
                           out_shardings=(grad_shardings, replicated))
    update_program = jax.jit(self.update_step,
                             in_shardings=(self.state_shardings, grad_shardings, replicated),
                             out_shardings=(self.state_shardings, replicated),
                             donate_argnums=(0,),
                             compiler_options=self._elementwise_options)
    return grad_program, update_program

  def abstract_batch(self, dtype=np.int32) -> Dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes and shardings, for compiling before the first batch."""
    return {k: jax.ShapeDtypeStruct(v.shape, dtype, sharding=self.batch_shardings[k])
            for k, v in self._dummy.items()}

  def precompile_train_step(self, state, batch, once: bool = False):
    """Compiles the train step for these (sharded, or abstract: `abstract_state`,
    `abstract_batch`) arguments ahead of its first call, which then finds it in JAX's
    compilation cache, and hands the compiler's freed heap back to the system
    (utils.release_free_memory): otherwise the process keeps it, and the first step's
    buffers come on top of it in the peak RSS. Returns the compiled programs, one or
    two (`split_update`), for their memory analysis; with `once`, nothing (an empty
    list) when it already compiled the step for batches of these shapes and dtypes."""
    key = tuple(sorted((k, tuple(v.shape), np.dtype(v.dtype).name) for k, v in batch.items()))
    if once and key == self._precompiled_for:
      return []
    self._precompiled_for = key
    programs = self._train_programs
    with self.partitioner.context():
      lowered = programs[0].lower(state, batch)
      if len(programs) == 1:
        compiled = [lowered.compile()]
      else:
        # The update (which takes what the gradient program gives) is lowered and
        # compiled beside the gradient program's compile: XLA's compile leaves a core
        # idle much of the time.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
          grad_program = pool.submit(lowered.compile)
          grads, metrics = lowered.out_info
          update_program = programs[1].lower(state, grads, metrics).compile()
          compiled = [grad_program.result(), update_program]
    utils.release_free_memory()
    return compiled

  @property
  def jit_eval_step(self):
    if self._jit_eval_step is None:
      step = jax.jit(self.eval_step,
                     in_shardings=(self.state_shardings.params, self.batch_shardings),
                     out_shardings=self.partitioner.replicated())
      self._jit_eval_step = self._in_context(step)
    return self._jit_eval_step

  def _in_context(self, fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with self.partitioner.context():
        return fn(*args)
    return wrapped

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> Dict[str, Array]:
    return self.partitioner.shard_batch(
        {k: local_batch[k] for k in self._dummy}, self.batch_size)
