"""Tiny configs and helpers shared by the tests."""

import importlib.util
import json
import os
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import config as cfg
from models import model as model_lib

TINY = dict(vocab_size=256, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=2)


def tiny_decoder(**overrides) -> cfg.DecoderConfig:
  return cfg.DecoderConfig(**{**TINY, **overrides})


def tiny_encdec(**overrides) -> cfg.EncoderDecoderConfig:
  return cfg.EncoderDecoderConfig(**{**TINY, 'num_encoder_layers': 2, **overrides})


def random_batch(model: model_lib.BaseModel, batch_size: int, lengths, seed: int = 0,
                 packed: bool = False):
  """A batch of random tokens with every model feature filled consistently."""
  rng = np.random.RandomState(seed)
  b = model.dummy_batch(batch_size, lengths)
  vocab = model.config.vocab_size
  for k in b:
    if k.endswith('tokens'):
      b[k] = rng.randint(2, vocab, size=b[k].shape).astype(np.int32)
  for side, prefix in (('decoder', 'decoder_'), ('encoder', 'encoder_')):
    if f'{prefix}segment_ids' not in b:
      continue
    shape = b[f'{prefix}segment_ids'].shape
    if packed:
      seg = np.zeros(shape, np.int32)
      pos = np.zeros(shape, np.int32)
      for r in range(shape[0]):
        cut = rng.randint(2, shape[1] - 2)
        seg[r, :cut], seg[r, cut:] = 1, 2
        pos[r, :cut] = np.arange(cut)
        pos[r, cut:] = np.arange(shape[1] - cut)
    else:
      seg = np.ones(shape, np.int32)
      pos = np.broadcast_to(np.arange(shape[1]), shape).astype(np.int32)
    b[f'{prefix}segment_ids'] = seg
    b[f'{prefix}positions'] = pos
  if 'decoder_loss_weights' in b:
    b['decoder_loss_weights'] = np.ones_like(b['decoder_loss_weights'])
  if 'decoder_causal_attention' in b:
    b['decoder_causal_attention'] = np.zeros_like(b['decoder_causal_attention'])
  return b


def init_params(model: model_lib.BaseModel, batch, seed: int = 0):
  """Unboxed parameters (initialised under jit: eager init is several times slower)."""
  init = jax.jit(lambda rng, b: nn.unbox(model.init_variables(rng, b)['params']))
  return init(jax.random.PRNGKey(seed), batch)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_records(model_dir):
  """step -> (loss, batch hash) from MODEL_DIR/metrics.jsonl, the last record of
  each step (a resumed run repeats the steps after its checkpoint); a line cut
  short by SIGKILL is skipped."""
  path = os.path.join(model_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  out = {}
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if r['kind'] == 'step':
        out[r['step']] = (r['loss'], r['batch_hash'])
  return out


def train_command(model_dir, steps, length=32, *extra):
  """`python -m train` for the tiny LLaMA on the embedded corpus, batch 8."""
  return [sys.executable, '-m', 'train', '--gin_file=models/llama/tiny.gin',
          '--gin_file=runs/pretrain.gin', "--gin.MIXTURE_OR_TASK_NAME='stdlib_lm'",
          f"--gin.TASK_FEATURE_LENGTHS={{'targets': {length}}}", f'--gin.TRAIN_STEPS={steps}',
          f"--gin.MODEL_DIR='{model_dir}'", '--gin.BATCH_SIZE=8', '--gin.WARMUP_STEPS=2',
          '--gin.train_lib.train.eval_split=None', '--gin.train_lib.train.peak_flops=1e11',
          *extra]


def subprocess_env(devices=None):
  e = dict(os.environ)
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  if devices is not None:
    flags = [f for f in e.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    e['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  return e


def catches_sigterm(pid):
  """Process `pid` has a SIGTERM handler in place (Linux: SigCgt in /proc/PID/status):
  a test can send SIGTERM "as early as possible" without racing the start-up."""
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('SigCgt:'):
        return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
  return False


def load_script(name):
  """scripts/<name>.py as a module (scripts/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def lower_flash_attention(backend, heads, kv_heads, q_len, kv_len, head_dim, dtype, features,
                          block_sizes=None):
  """Lowers flash attention's forward and gradient (q, k, v, T5 table) for the
  backend's device on this machine: (forward text, backward text).

  features: any of 'causal', 'prefix', 'segments', 'alibi', 't5'. The caller
  traces inside `pallas_kernels.backend.lowering_only()` so interpret=False
  passes on CPU.
  """
  from pallas_kernels.flash_attention import ops  # pylint: disable=g-import-not-at-top
  from pallas_kernels.flash_attention import xla as ref  # pylint: disable=g-import-not-at-top
  q = jax.ShapeDtypeStruct((2, q_len, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((2, kv_len, kv_heads, head_dim), dtype)
  q_ids = jax.ShapeDtypeStruct((2, q_len), jnp.int32)
  kv_ids = jax.ShapeDtypeStruct((2, kv_len), jnp.int32)
  table = jax.ShapeDtypeStruct((heads, 32), jnp.float32)

  def attend(q, k, v, q_ids, kv_ids, table):
    kw = {}
    if 'segments' in features:
      kw.update(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_positions=q_ids,
                kv_positions=kv_ids)
    if 'prefix' in features:
      kw.update(q_prefix=q_ids, kv_prefix=kv_ids)
    if 'alibi' in features:
      kw['alibi_slopes'] = jnp.asarray(ref.alibi_slopes(heads))
    if 't5' in features:
      kw['rel_bias'] = ref.RelativeBias(table)
    return ops.flash_attention(q, k, v, causal='causal' in features, backend=backend,
                               interpret=False, block_sizes=block_sizes, **kw)

  return lower_forward_and_grad(backend, attend, (q, kv, kv, q_ids, kv_ids, table),
                                argnums=(0, 1, 2, 5))


def lower_forward_and_grad(backend, fn, args, argnums):
  """Lowers `fn(*args)` and the gradient of its f32 sum with respect to
  `argnums` for the backend's device ('gpu': cuda, 'tpu'), on this machine:
  (forward text, backward text). args may be jax.ShapeDtypeStructs."""
  platform = {'gpu': 'cuda', 'tpu': 'tpu'}[backend]

  def loss(*a):
    return fn(*a).astype(jnp.float32).sum()

  fwd = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  bwd = jax.jit(jax.grad(loss, argnums=argnums)).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()
  return fwd, bwd


CORRUPTIONS = ('bitflip', 'truncate', 'delete', 'metadata')


def corrupt(model_dir, step, kind):
  """Damages checkpoint `step` of MODEL_DIR: one flipped bit in the middle of
  its largest data file, that file cut in half or deleted, or garbage in the
  state's metadata. Returns the damaged file's path."""
  root = os.path.join(model_dir, 'checkpoints', str(step))
  if kind == 'metadata':
    path = os.path.join(root, 'state', '_METADATA')
    with open(path, 'w') as f:
      f.write('{"tree_metadata": garbage')
    return path
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, 'state')) for f in fs]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  if kind == 'bitflip':
    with open(path, 'r+b') as f:
      f.seek(size // 2)
      byte = f.read(1)[0]
      f.seek(size // 2)
      f.write(bytes([byte ^ 0x10]))
  elif kind == 'truncate':
    with open(path, 'r+b') as f:
      f.truncate(size // 2)
  elif kind == 'delete':
    os.remove(path)
  else:
    raise ValueError(kind)
  return path
