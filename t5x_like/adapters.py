"""Runs that train part of the model: where the frozen parameters come from, and
checkpoints that hold only the trained part.

When `train.trainable_params` (or a PEFT method, or DPO's frozen reference) leaves
parameters frozen, the run's checkpoints hold only the trained parameters and their
optimizer state. The frozen ones are what the run started from (its
`INITIAL_CHECKPOINT`, converted as the model needs, e.g. quantized for QLoRA, or the
seeded initialisation without one); `MODEL_DIR/frozen.json` records that source and a
digest of the frozen parameters. Resuming, `infer`, `eval`, `hf export` and `merge`
rebuild the frozen parameters from the source (or from another copy of the base given
instead) and refuse, in one line, a base whose digest differs.

    python -m t5x_like.adapters merge --model_dir=RUN --output_dir=OUT [--base=BASE]

writes OUT/config.gin and OUT/checkpoints/0 holding the plain model the run equals
(LoRA and IA3 folded into the kernels, a quantized base dequantized): a MODEL_DIR that
`infer`, `eval`, `train` (`INITIAL_CHECKPOINT`) and `hf export` read like any other.
"""

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import config as model_config
from models import model as model_lib
from models import peft
from t5x_like import checkpoints
from t5x_like import gin_utils
from t5x_like import upcycle
from t5x_like import utils

RECORD = 'frozen.json'


class AdapterError(checkpoints.CheckpointError):
  """A frozen base that does not match what a run was trained on."""


# --- where a run's starting parameters come from ----------------------------------
def initial_checkpoint(path, upcycle_flag: bool, model, lengths
                       ) -> Optional[checkpoints.InitialCheckpoint]:
  """The InitialCheckpoint of `train.initial_checkpoint` (and its upcycle flag) for `model`."""
  if upcycle_flag and not path:
    raise model_config.ConfigError(
        'train.initial_checkpoint_upcycle = True needs train.initial_checkpoint: set '
        'INITIAL_CHECKPOINT to the dense run to upcycle')
  if path is None or isinstance(path, checkpoints.InitialCheckpoint):
    return path
  if upcycle_flag:
    return upcycle.UpcycleCheckpoint(path, model.config)
  peft_config = model.config.peft
  if (peft_config is not None and peft_config.quantization != model_config.BaseQuantization.NONE
      and isinstance(model, model_lib.BaseModel)):
    return _quantized_base(path, model, lengths)
  # A PEFT model starts from its base: the parameters the method adds start fresh.
  return checkpoints.ParamsCheckpoint(path, added=model.added_pattern(),
                                      derived=getattr(model, 'derived_pattern', lambda: None)())


def _quantized_base(path: str, model: model_lib.BaseModel, lengths
                    ) -> checkpoints.InitialCheckpoint:
  """QLoRA: the base run's f32 weight matrices, quantized as they are restored."""
  base = model.without_peft()
  dummy = base.dummy_batch(1, lengths)
  saved_abstract = jax.eval_shape(lambda: nn.unbox(base.init_variables(
      jax.random.PRNGKey(0), dummy)['params']))
  added = model.added_pattern()
  config = model.config.peft

  def convert(restored, params):
    shardings = jax.tree.map(lambda x: x.sharding, params)
    target = jax.eval_shape(lambda: params)
    fn = jax.jit(lambda r, p: peft.combine(peft.split(p, added)[0],
                                           peft.quantize_like(r, target, config)),
                 out_shardings=shardings)
    return fn(restored, params)

  return checkpoints.ConvertedCheckpoint(
      path, saved_abstract, convert, f'its weight matrices quantized to '
      f'{config.quantization.value}; the {config.method.value} parameters fresh')


# --- the record of the frozen parameters ---------------------------------------------
def digest(tree: Any) -> str:
  """One digest of a parameter tree (of its arrays' digests), the same on any mesh."""
  digests, _ = checkpoints.state_digests(tree)
  return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def record(pattern: Optional[str], frozen: Any, initial: Optional[checkpoints.InitialCheckpoint],
           seed: int) -> Dict[str, Any]:
  """What `frozen.json` says of a run's frozen parameters."""
  source = None
  if initial is not None:
    source = {'directory': initial.directory, 'step': initial.step}
  return {'trainable_params': pattern, 'digest': digest(frozen), 'initial_checkpoint': source,
          'seed': seed, 'num_frozen': int(sum(x.size for x in jax.tree.leaves(frozen)))}


def read_record(model_dir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(model_dir, RECORD)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_record(model_dir: str, rec: Dict[str, Any]) -> None:
  tmp = os.path.join(model_dir, RECORD + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(rec, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(model_dir, RECORD))


def check_digest(rec: Dict[str, Any], frozen: Any, where: str, base_setting: str) -> None:
  got = digest(frozen)
  if got != rec['digest']:
    source = rec.get('initial_checkpoint') or {'directory': f'the seed-{rec.get("seed")} init'}
    raise AdapterError(
        f'the frozen base rebuilt for {where} has digest {got}, but the run was trained on '
        f'{rec["digest"]} ({source["directory"]}): point {base_setting} at the base it was '
        'trained from')


def model_dir_of(checkpoint_path: str) -> str:
  """The MODEL_DIR of a MODEL_DIR, its checkpoints/ folder or one checkpoints/<step>."""
  path = os.path.abspath(checkpoint_path).rstrip('/')
  if os.path.basename(path).isdigit():
    path = os.path.dirname(path)
  if os.path.basename(path) == 'checkpoints':
    path = os.path.dirname(path)
  return path


# --- reading a run that saved only its trained parameters --------------------------
class AdapterCheckpoint(checkpoints.InitialCheckpoint):
  """A run's trained parameters (its checkpoint) over its frozen base (rebuilt from the
  base it records, or `base`), verified against the recorded digest.

  Args:
    path: the run's MODEL_DIR or one of its checkpoints.
    model: the run's model.
    lengths: feature lengths (for the model's dummy batch).
    base: another copy of the base (a MODEL_DIR or checkpoint); None: the recorded one.
    setting, base_setting: what the user sets `path` and `base` by.
  """

  def __init__(self, path: str, model, lengths, base: Optional[str] = None,
               setting: str = 'CHECKPOINT_PATH', base_setting: str = 'BASE_CHECKPOINT',
               partitioner=None):
    super().__init__(path, setting)
    self.model = model
    self.lengths = lengths
    self.partitioner = partitioner
    self.base_setting = base_setting
    self.rec = read_record(model_dir_of(path))
    if self.rec is None:
      raise AdapterError(f'{path} has no {RECORD}: it is not a run that saved only its trained '
                         'parameters')
    source = base or (self.rec['initial_checkpoint'] or {}).get('directory')
    if source and base is None and self.rec['initial_checkpoint']:
      source = os.path.join(source, str(self.rec['initial_checkpoint']['step']))
    self.base = None if source is None else initial_checkpoint(source, False, model, lengths)
    if self.base is not None:
      self.base.setting = base_setting
    self._trained = None

  def check(self, abstract_params: Any) -> None:
    self.directory, self.step = checkpoints.resolve(self.path, self.setting)
    saved = checkpoints.saved_params(self.directory, self.step, self.setting)
    trained, _ = peft.split(abstract_params, self.rec['trainable_params'])
    self._trained = trained
    checkpoints.compare_params(saved, trained, self.step, self.directory,
                               'use the model config of the run that wrote it')
    if self.base is not None:
      self.base.check(abstract_params)

  def _check(self, saved, abstract_params):  # (check does it all)
    del saved, abstract_params

  def restore(self, params: Any) -> Any:
    """params: the model's parameters or their ShapeDtypeStructs (layout and shardings)."""
    if self.base is None:  # the run started from its seeded initialisation
      start = fresh_params(self.model, self.partitioner, self.lengths, self.rec['seed'])
    else:  # (the values of the parameters the base lacks are not used: they are trained)
      start = self.base.restore(jax.tree.map(
          lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), params))
    if hasattr(self.model, 'with_reference'):
      start = self.model.with_reference(start)
    frozen = peft.split(start, self.rec['trainable_params'])[1]
    check_digest(self.rec, frozen, self.path, self.base_setting)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            self._trained)
    trained = checkpoints.restore_params(self.directory, self.step, abstract)
    return peft.combine(trained, frozen)

  def describe(self) -> str:
    base = self.base.describe() if self.base is not None else 'the seeded initialisation'
    return (f'trained parameters from {self.directory} step {self.step} over the frozen base '
            f'({base}; digest {self.rec["digest"]} verified)')


def params_checkpoint(path: str, model, lengths, base: Optional[str] = None,
                      setting: str = 'CHECKPOINT_PATH', base_setting: str = 'BASE_CHECKPOINT',
                      partitioner=None) -> checkpoints.InitialCheckpoint:
  """How infer, eval and export read `path`: over its recorded base when the run saved
  only its trained parameters, as it is otherwise."""
  if read_record(model_dir_of(path)) is not None:
    return AdapterCheckpoint(path, model, lengths, base, setting, base_setting, partitioner)
  if base is not None:
    raise AdapterError(f'{base_setting}={base!r} is given but {path} holds whole models (no '
                       f'{RECORD}): leave {base_setting} unset')
  return checkpoints.ParamsCheckpoint(path, setting)


def fresh_params(model, partitioner, lengths, seed: int = 0):
  """The model's seeded initial parameters, on their shardings (what a run without an
  initial checkpoint starts from)."""
  with partitioner.context():
    boxed = jax.eval_shape(lambda: model.init_variables(jax.random.PRNGKey(seed), model.dummy_batch(
        1, lengths))['params'])
    shardings = partitioner.boxed_shardings(boxed)
    init = jax.jit(lambda: nn.unbox(model.init_variables(jax.random.PRNGKey(seed),
                                                         model.dummy_batch(1, lengths))['params']),
                   out_shardings=shardings)
    return init()


# --- merge ---------------------------------------------------------------------------
def merge(model_dir: str, output_dir: str, base: Optional[str] = None,
          notice: Callable[[str], None] = print) -> Dict[str, Any]:
  """Writes the plain model a PEFT run equals as OUTPUT_DIR/config.gin + checkpoints/0."""
  from partitioning import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from partitioning import partitioner as partitioner_lib  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(model_dir, 'config.gin')
  if not os.path.isfile(config_path):
    raise AdapterError(f'{model_dir} has no config.gin: give the MODEL_DIR of a PEFT run')
  if checkpoints.all_steps(output_dir):
    raise AdapterError(f'{output_dir} already holds a checkpoint: choose a new --output_dir')
  model = gin_utils.model_from_gin([config_path])
  if model.config.peft is None:
    raise AdapterError(f'{model_dir} is not a PEFT run (its model has no PeftConfig): there '
                       'is nothing to merge')
  lengths = {'inputs': 8, 'targets': 8}
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1)))
  params = fresh_params(model, part, lengths)
  ckpt = params_checkpoint(model_dir, model, lengths, base, '--model_dir', '--base', part)
  ckpt.check(jax.eval_shape(lambda: params))
  full = ckpt.restore(params)
  plain_model = model.without_peft()
  plain = jax.eval_shape(lambda: nn.unbox(plain_model.init_variables(
      jax.random.PRNGKey(0), plain_model.dummy_batch(1, lengths))['params']))
  merged = jax.device_get(peft.merge_into_base(full, model.config.peft, plain))
  os.makedirs(output_dir, exist_ok=True)
  with open(config_path) as f:
    text = f.read()
  with open(os.path.join(output_dir, 'config.gin'), 'w') as f:
    f.write(text + f'\n# Merged by python -m t5x_like.adapters merge from {model_dir} step '
            f'{ckpt.step}: the plain model.\nmodel_config.DecoderConfig.peft = None\n'
            'model_config.EncoderDecoderConfig.peft = None\n')
  saver = checkpoints.Checkpointer(output_dir, async_save=False)
  try:
    saver.save(0, {'params': merged}, {'merged_from': os.path.abspath(model_dir),
                                       'step': ckpt.step})
  finally:
    saver.close()
  notice(f'merged {model_dir} step {ckpt.step} ({model.config.peft.method.value}) into '
         f'{output_dir}: a plain model of {sum(x.size for x in jax.tree.leaves(merged)):,} '
         'parameters')
  return {'output_dir': output_dir, 'step': ckpt.step}


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='python -m t5x_like.adapters',
                              description='Merge a PEFT run into a plain checkpoint.')
  sub = p.add_subparsers(dest='command', required=True)
  m = sub.add_parser('merge', help='write the plain model a PEFT run equals')
  m.add_argument('--model_dir', required=True)
  m.add_argument('--output_dir', required=True)
  m.add_argument('--base', default=None, help='another copy of the base (default: the recorded one)')
  args = p.parse_args(argv)
  try:
    merge(args.model_dir, args.output_dir, args.base)
  except (utils.InputError, checkpoints.CheckpointError, model_config.ConfigError) as e:
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
