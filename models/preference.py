"""Preference alignment: DPO and IPO against a frozen reference, and the losses themselves.

`DpoModel` wraps a policy (a `DecoderOnlyModel` or `EncoderDecoderModel`, with or
without a PEFT method) and trains it on pairs: each batch row holds one pair, its
prompt + chosen response in the `chosen_*` features and the same prompt + rejected
response in the `rejected_*` features (`t5x_like/data/preferences.py` makes them),
so the two halves of a pair are always in the same batch.

The reference model (the policy as it started) is computed on the fly:
  * a PEFT policy's reference is the same module without its PEFT parameters on
    the same frozen base: no second copy of the weights;
  * a fully fine-tuned policy keeps a frozen copy of its starting parameters in
    the `reference` sub-tree of the parameters (no gradient, no optimizer state;
    `infer`, `eval` and export read the policy and ignore it);
or precomputed once into the batches (`reference_chosen_log_likelihood`,
`reference_rejected_log_likelihood` [batch]), and then nothing of it is held.

Losses (h = the chosen log-ratio minus the rejected one, each log pi - log pi_ref
summed over the response tokens):
  DPO (Rafailov et al., 2023): -log sigmoid(beta * h)
  IPO (Azar et al., 2023):     (h - 1 / (2 beta))^2
"""

import enum
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from models import config as cfg
from models import metrics as metrics_lib
from models import model as model_lib
from models import param_count
from models import peft
from models import transformer

Array = jax.Array
REFERENCE = 'reference'  # the parameter sub-tree of a full-parameter DPO run's reference
SIDES = ('chosen', 'rejected')
REFERENCE_FEATURES = ('reference_chosen_log_likelihood', 'reference_rejected_log_likelihood')


class PreferenceLoss(enum.Enum):
  DPO = 'dpo'
  IPO = 'ipo'


class Reference(enum.Enum):
  ON_THE_FLY = 'on_the_fly'  # the frozen reference runs beside the policy in every step
  PRECOMPUTED = 'precomputed'  # its log-likelihoods arrive in the batches


def preference_loss(policy_chosen: Array, policy_rejected: Array, reference_chosen: Array,
                    reference_rejected: Array, beta: float,
                    kind: PreferenceLoss = PreferenceLoss.DPO) -> Tuple[Array, Array, Array]:
  """Per-pair loss and the implicit rewards beta * (log pi - log pi_ref) of both responses.

  Args:
    policy_chosen, policy_rejected: [pairs] summed log-likelihoods of the responses under
      the policy; reference_*: the same under the reference.
    beta: the KL strength (DPO's beta; IPO's tau).
    kind: DPO or IPO.

  Returns:
    (loss [pairs], chosen reward [pairs], rejected reward [pairs]).
  """
  chosen_ratio = policy_chosen - reference_chosen
  rejected_ratio = policy_rejected - reference_rejected
  h = chosen_ratio - rejected_ratio
  if kind == PreferenceLoss.DPO:
    loss = -jax.nn.log_sigmoid(beta * h)
  else:
    loss = jnp.square(h - 1.0 / (2.0 * beta))
  return loss, beta * chosen_ratio, beta * rejected_ratio


def side_batch(batch: Mapping[str, Array], side: str) -> Dict[str, Array]:
  n = len(side) + 1
  return {k[n:]: v for k, v in batch.items() if k.startswith(side + '_')}


class PairedModel:
  """What DPO and reward models share: a model trained on preference pairs, one pair per
  row (`chosen_*` and `rejected_*` features of the wrapped model's)."""

  def __init__(self, policy: model_lib.BaseModel, precomputed: bool = False):
    if not isinstance(policy, model_lib.BaseModel):
      raise cfg.ConfigError(f'{type(self).__name__}.policy={policy!r} must be a model: bind '
                            'it to %MODEL')
    self.policy = policy
    self.config = policy.config
    self.encoder_decoder = isinstance(policy, model_lib.EncoderDecoderModel)
    side_features = policy.FEATURES + policy.OPTIONAL_FEATURES
    self.FEATURES = tuple(f'{s}_{k}' for s in SIDES for k in side_features)  # pylint: disable=invalid-name
    self._precomputed = precomputed
    if precomputed:
      self.FEATURES += REFERENCE_FEATURES
    self.OPTIONAL_FEATURES = ()  # pylint: disable=invalid-name

  @property
  def needs_rng(self) -> bool:
    return self.policy.needs_rng

  def feature_shapes(self, batch_size: int, feature_lengths: Mapping[str, int]):
    lengths = paired_lengths(feature_lengths)
    shapes = {f'{s}_{k}': v for s in SIDES
              for k, v in self.policy.feature_shapes(batch_size, lengths).items()}
    if self._precomputed:
      shapes.update({k: (batch_size,) for k in REFERENCE_FEATURES})
    return shapes

  def dummy_batch(self, batch_size, feature_lengths):
    import numpy as np  # pylint: disable=g-import-not-at-top
    return {k: np.zeros(s, np.float32 if k in REFERENCE_FEATURES else np.int32)
            for k, s in self.feature_shapes(batch_size, feature_lengths).items()}

  def check_lengths(self, feature_lengths: Mapping[str, int]) -> None:
    self.policy.check_lengths(paired_lengths(feature_lengths))

  def _pair_count(self, batch) -> Tuple[Array, Array]:
    """(valid [batch] 0/1: the rows holding a pair, their number)."""
    valid = (jnp.sum(batch['chosen_decoder_loss_weights'], axis=-1) > 0).astype(jnp.float32)
    return valid, jnp.sum(valid)


class DpoModel(PairedModel):
  """A policy trained on preference pairs (see the module docstring).

  Args:
    policy: the model being aligned (its gin file's MODEL).
    beta: DPO's beta (IPO's tau): how far the policy may move from the reference.
    loss: 'dpo' or 'ipo'.
    reference: 'on_the_fly' or 'precomputed'.
  """

  def __init__(self, policy: model_lib.BaseModel, beta: float = 0.1, loss: str = 'dpo',
               reference: str = 'on_the_fly'):
    if not beta > 0:
      raise cfg.ConfigError(f'DpoModel.beta={beta} must be > 0 (e.g. 0.1)')
    self.beta = float(beta)
    self.loss_kind = cfg._coerce(PreferenceLoss, loss, 'DpoModel.loss')  # pylint: disable=protected-access
    self.reference = cfg._coerce(Reference, reference, 'DpoModel.reference')  # pylint: disable=protected-access
    super().__init__(policy, precomputed=self.reference == Reference.PRECOMPUTED)
    # The reference of a PEFT policy: the same model without the PEFT parameters.
    self._base = (policy.without_peft(keep_quantization=True)
                  if policy.config.peft is not None else None)

  # --- what the trainer and pipeline use -------------------------------------------
  @property
  def holds_reference_copy(self) -> bool:
    """Whether the parameters carry a frozen copy of the starting policy (`reference/`)."""
    return self.reference == Reference.ON_THE_FLY and self._base is None

  def trainable_pattern(self) -> Optional[str]:
    if self.policy.config.peft is not None:
      return peft.trainable_pattern(self.policy.config.peft)
    return f'^(?!{REFERENCE}/)' if self.holds_reference_copy else None

  def added_pattern(self) -> Optional[str]:
    """Parameters an initial checkpoint of the policy lacks (the PEFT method's)."""
    return self.policy.added_pattern()

  def derived_pattern(self) -> Optional[str]:
    """Parameters made from the restored policy (`with_reference`): the reference copy."""
    return f'^{REFERENCE}/' if self.holds_reference_copy else None

  def _base_params(self, params):
    return peft.split(params, self.policy.added_pattern())[1]

  def policy_params(self, params):
    if self.holds_reference_copy:
      return {k: v for k, v in params.items() if k != REFERENCE}
    return params

  def with_reference(self, params):
    """The parameters with the reference copy made from the policy's (a fresh run)."""
    if not self.holds_reference_copy:
      return params
    policy = self.policy_params(params)
    return {**policy, REFERENCE: jax.tree.map(jnp.copy, policy)}

  def flops_per_example(self, feature_lengths: Mapping[str, int]) -> float:
    """Training FLOPs of one pair: both responses through the policy (forward and
    backward) and, on the fly, through the reference (forward: a third of that)."""
    lengths = paired_lengths(feature_lengths)
    one = param_count.train_flops_per_example(self.config, lengths.get('inputs', 0),
                                              lengths['targets'])
    return 2 * one * (4 / 3 if self.reference == Reference.ON_THE_FLY else 1)

  def init_variables(self, rng: Array, batch: Mapping[str, Array]):
    variables = self.policy.init_variables(rng, side_batch(batch, 'chosen'))
    if self.holds_reference_copy:
      params = dict(variables['params'])
      params[REFERENCE] = variables['params']
      variables = {**variables, 'params': params}
    return variables

  # --- the loss ----------------------------------------------------------------------
  def sequence_scores(self, model, params, batch, dropout_rng=None):
    """(Public: scripts/precompute_reference.py scores with it.) Summed response log-likelihoods [batch], per-token log-probs over the vocabulary
    [batch, length, vocab] and the response mask [batch, length]."""
    logits = model.apply(params, batch, dropout_rng)
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp_all, batch['decoder_target_tokens'][..., None].astype(
        jnp.int32), axis=-1)[..., 0]
    weights = batch['decoder_loss_weights'].astype(jnp.float32)
    return jnp.sum(token_logp * weights, axis=-1), logp_all, weights

  def _reference_scores(self, params, batch):
    if self._base is not None:
      return self.sequence_scores(self._base, self._base_params(params), batch)
    return self.sequence_scores(self.policy, params[REFERENCE], batch)

  def loss_fn(self, params, batch, dropout_rng=None, token_groups=None
              ) -> Tuple[Array, metrics_lib.Metrics]:
    """The summed pair loss and the metrics: `loss` per pair, `rewards/{chosen,rejected,
    margin,accuracy}`, `logps/{chosen,rejected}` (policy, summed per response) and, on
    the fly, `kl`: the per-token KL(policy || reference) of the next-token distributions
    along the responses."""
    del token_groups
    policy = self.policy_params(params)
    scores, ref_scores, kl_sum, tokens = {}, {}, 0.0, 0.0
    for i, side in enumerate(SIDES):
      b = side_batch(batch, side)
      key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      scores[side], logp_all, w = self.sequence_scores(self.policy, policy, b, key)
      if self.reference == Reference.PRECOMPUTED:
        ref_scores[side] = batch[f'reference_{side}_log_likelihood'].astype(jnp.float32)
      else:
        ref_score, ref_logp_all, _ = jax.lax.stop_gradient(self._reference_scores(params, b))
        ref_scores[side] = ref_score
        kl_tok = jnp.sum(jnp.exp(logp_all) * (logp_all - ref_logp_all), axis=-1)  # [b, len]
        kl_sum = kl_sum + jnp.sum(jax.lax.stop_gradient(kl_tok) * w)
        tokens = tokens + jnp.sum(w)
    valid, n = self._pair_count(batch)
    loss, chosen_r, rejected_r = preference_loss(
        scores['chosen'], scores['rejected'], ref_scores['chosen'], ref_scores['rejected'],
        self.beta, self.loss_kind)

    def per_pair(x, console=None):
      return metrics_lib.Average(jnp.sum(x * valid), n, console=console)
    loss_sum = jnp.sum(loss * valid)
    metrics = {
        'loss': per_pair(loss, '.4f'),
        'rewards/chosen': per_pair(chosen_r),
        'rewards/rejected': per_pair(rejected_r),
        'rewards/margin': per_pair(chosen_r - rejected_r, '.3f'),
        # A tie (as at the start, when the policy is the reference) counts one half.
        'rewards/accuracy': per_pair(0.5 * (1.0 + jnp.sign(chosen_r - rejected_r)), '.3f'),
        'logps/chosen': per_pair(scores['chosen']),
        'logps/rejected': per_pair(scores['rejected']),
        'pairs': metrics_lib.Sum(n),
    }
    if self.reference == Reference.ON_THE_FLY:
      metrics['kl'] = metrics_lib.Average(kl_sum, tokens, console='.4f')
    return loss_sum, metrics




class RewardModel(PairedModel):
  """A scalar reward r(prompt, response) on a decoder, trained on preference pairs with the
  Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)).

  The reward is w . h, h the final (normed) hidden state at the response's last token
  (its EOS); w (`decoder/reward_head`, [embed]) starts at zero, so every reward starts at
  0. The decoder starts from INITIAL_CHECKPOINT (e.g. an SFT run); with a PEFT method only
  its parameters and the head train.

  Args:
    policy: the decoder (its gin file's MODEL).
  """

  def __init__(self, policy: model_lib.BaseModel):
    super().__init__(policy)
    if self.encoder_decoder:
      raise cfg.ConfigError('RewardModel puts its head on a decoder-only model: bind '
                            'RewardModel.policy to a DecoderOnlyModel')
    self.module = transformer.DecoderOnly(self.config, reward_head=True)
    self._train_module = self.module.clone(deterministic=False)

  def trainable_pattern(self) -> Optional[str]:
    own = self.policy.trainable_pattern()
    return None if own is None else f'(?:{own})|(^|/)reward_head$'

  def added_pattern(self) -> Optional[str]:
    own = self.policy.added_pattern()
    return '(^|/)reward_head$' + (f'|(?:{own})' if own else '')

  def flops_per_example(self, feature_lengths: Mapping[str, int]) -> float:
    lengths = paired_lengths(feature_lengths)
    return 2 * param_count.train_flops_per_example(self.config, lengths.get('inputs', 0),
                                                   lengths['targets'])

  def dummy_batch(self, batch_size, feature_lengths):
    if 'chosen' not in feature_lengths:  # (scoring single examples: the decoder's features)
      return self.policy.dummy_batch(batch_size, feature_lengths)
    return super().dummy_batch(batch_size, feature_lengths)

  def init_variables(self, rng: Array, batch: Mapping[str, Array]):
    if 'chosen_decoder_input_tokens' in batch:
      batch = side_batch(batch, 'chosen')
    variables = self.module.init({'params': rng}, **self.policy._module_inputs(batch))  # pylint: disable=protected-access
    peft.check(self.config.peft, variables['params'])
    return variables

  def rewards(self, params, batch: Mapping[str, Array], dropout_rng=None) -> Array:
    """r(prompt, response) [batch] of the decoder features of (prompt, response) rows: at
    each row's last token of loss weight > 0 (0 for a row without one)."""
    module, kwargs = self.module, {}
    if dropout_rng is not None:
      module, kwargs = self._train_module, {'rngs': {'dropout': dropout_rng}}
    per_position = module.apply({'params': params}, **self.policy._module_inputs(batch),  # pylint: disable=protected-access
                                **kwargs)  # [batch, length]
    weights = batch['decoder_loss_weights'] > 0
    length = weights.shape[1]
    last = length - 1 - jnp.argmax(weights[:, ::-1], axis=1)
    r = jnp.take_along_axis(per_position, last[:, None], axis=1)[:, 0]
    return jnp.where(jnp.any(weights, axis=1), r, 0.0)

  def loss_fn(self, params, batch, dropout_rng=None, token_groups=None
              ) -> Tuple[Array, metrics_lib.Metrics]:
    """The summed Bradley-Terry loss; metrics `loss`, `rewards/{chosen,rejected,margin,
    accuracy}` (a tie counts one half)."""
    del token_groups
    r = {}
    for i, side in enumerate(SIDES):
      key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      r[side] = self.rewards(params, side_batch(batch, side), key)
    valid, n = self._pair_count(batch)
    margin = r['chosen'] - r['rejected']
    loss = -jax.nn.log_sigmoid(margin)

    def per_pair(x, console=None):
      return metrics_lib.Average(jnp.sum(x * valid), n, console=console)
    metrics = {
        'loss': per_pair(loss, '.4f'),
        'rewards/chosen': per_pair(r['chosen']),
        'rewards/rejected': per_pair(r['rejected']),
        'rewards/margin': per_pair(margin, '.3f'),
        'rewards/accuracy': per_pair(0.5 * (1.0 + jnp.sign(margin)), '.3f'),
        'pairs': metrics_lib.Sum(n),
    }
    return jnp.sum(loss * valid), metrics


def paired_lengths(feature_lengths: Mapping[str, int]) -> Dict[str, int]:
  """The policy's lengths for paired task lengths {'inputs', 'chosen', 'rejected'}
  (targets: the longer response)."""
  missing = [k for k in SIDES if k not in feature_lengths]
  if missing:
    raise cfg.ConfigError(f'preference data needs a length for {missing[0]!r}: set '
                          "TASK_FEATURE_LENGTHS = {'inputs': ..., 'chosen': ..., 'rejected': ...}")
  out = {'targets': max(feature_lengths['chosen'], feature_lengths['rejected'])}
  if 'inputs' in feature_lengths:
    out['inputs'] = feature_lengths['inputs']
  return out
