"""The input process (t5x_like/data/service.py) serves what the in-process pipeline
serves: the same checks, shapes, batches, hashes, positions (skip, restore) and
errors; the trainer's import closure holds no TensorFlow; `python -m train` trains
on the same batches with it as without it."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from models import model as model_lib
from models import preference
from t5x_like import xla_env
from t5x_like.data import errors
from t5x_like.data import pipeline
from t5x_like.data import service

import testing_utils as tu

DEC = model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384))
ENCDEC = model_lib.EncoderDecoderModel(tu.tiny_encdec(vocab_size=384))
CASES = {
    'decoder packed': (pipeline.DatasetConfig('stdlib_lm', {'targets': 64}, batch_size=4, seed=3),
                       DEC),
    'prefix lm unpacked': (pipeline.DatasetConfig('stdlib_prefix_lm',
                                                  {'inputs': 32, 'targets': 32}, batch_size=4,
                                                  pack=False), DEC),
    'span corruption': (pipeline.DatasetConfig('stdlib_span_corruption',
                                               {'inputs': 64, 'targets': 16}, batch_size=4),
                        ENCDEC),
    'ul2': (pipeline.DatasetConfig('stdlib_ul2', {'inputs': 384, 'targets': 128}, batch_size=4),
            ENCDEC),
    'dpo pairs': (pipeline.DatasetConfig('stdlib_preferences',
                                         {'inputs': 32, 'chosen': 32, 'rejected': 32},
                                         batch_size=4, pack=False), preference.DpoModel(DEC)),
}


@pytest.fixture(scope='module')
def process():
  p = service.InputProcess()
  yield p
  p.close()


def _same_batch(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize('case', sorted(CASES))
def test_serves_what_the_pipeline_serves(process, case):
  """prepare (shapes, loss groups), batches with their hashes and positions, a row
  slice and state, then (for two converters) skip, restore and a second iterator:
  each the same as `LocalInputs` in this process.
  (UL2's batches come from the same seqio functions as span corruption's: its case
  checks what differs, the shapes and the per-denoiser loss groups.)"""
  config, model = CASES[case]
  eval_config = config.__class__(**{**config.__dict__, 'split': 'validation', 'shuffle': False})
  local, remote = service.LocalInputs(), process
  lp, rp = (x.prepare(config, eval_config, model) for x in (local, remote))
  assert lp.shapes == rp.shapes and lp.loss_groups == rp.loss_groups
  assert bool(lp.loss_groups) == (case == 'ul2')
  lp.check_eval()
  rp.check_eval()
  if case == 'ul2':
    return
  rows = slice(1, 3)
  li, ri = (x.iterator(config, model, rows) for x in (local, remote))
  for _ in range(2):
    _same_batch(next(li), next(ri))
    assert li.last_batch_hash == ri.last_batch_hash
    assert li.batches_consumed == ri.batches_consumed
  state = ri.state()
  assert state == li.state()
  if case not in ('decoder packed', 'dpo pairs'):  # (positions do not depend on the converter)
    return
  for it in (li, ri):
    it.skip(2)
  _same_batch(next(li), next(ri))
  assert li.skipped == ri.skipped == [[2, 4]] and ri.state() == li.state()
  for it in (li, ri):  # back to after batch 2
    it.restore(state)
  _same_batch(next(li), next(ri))
  assert ri.batches_consumed == li.batches_consumed == 3 and ri.skipped == []
  # A second iterator of the same process (the evaluation batches): its own position.
  le, re_ = (x.iterator(eval_config, model, slice(None)) for x in (local, remote))
  _same_batch(next(le), next(re_))
  assert ri.batches_consumed == 3 and re_.batches_consumed == 1


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='/proc and MADV_PAGEOUT')
def test_start_up_pages_are_handed_back(process, tmp_path):
  """`release_startup_pages` hands back file-backed pages this process alone maps (a
  file mapped and read here), and the input process calls it once its start-up is over
  (after `prepare`'s first batch). Measured in `python -m train`, where the trainer
  maps no TensorFlow: about half a GiB of the input process's RSS, docs/efficiency.md;
  pages another process maps too are not handed back (nor held twice)."""
  import mmap  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'pages'
  path.write_bytes(os.urandom(64 << 20))

  def rss_file():
    with open('/proc/self/status') as f:
      return next(int(l.split()[1]) for l in f if l.startswith('RssFile:'))
  with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    assert sum(m[i] for i in range(0, len(m), 4096)) >= 0  # (touch every page)
    before = rss_file()
    assert service.release_startup_pages() >= 64 << 20
    assert before - rss_file() > 48 << 10  # KiB: most of the 64 MiB
  config, model = CASES['decoder packed']
  process.prepare(config, None, model)
  next(process.iterator(config, model))
  assert process.call('released_bytes') > 100 << 20
  assert process.call('gc_enabled')  # (paused for start-up until a batch is out: xla_env)


def test_errors_come_back_as_raised(process):
  """Each error the pipeline raises in-process is raised by the input process's
  caller with the same class and message, in train()'s order of checks."""
  with pytest.raises(errors.DataError, match="unknown mixture or task 'no_such_task'"):
    process.prepare(pipeline.DatasetConfig('no_such_task', {'targets': 64}), None, DEC)
  bad = [  # (the same message here too: no part of it depends on what this process registered)
      (pipeline.DatasetConfig('stdlib_lm', {'inputs': 8, 'targets': 64}), DEC),  # a feature it lacks
      (pipeline.DatasetConfig('stdlib_lm', {'targets': 64}, split='nope'), DEC),
      (pipeline.DatasetConfig('stdlib_lm', {'targets': 64}),
       model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=64))),  # vocabulary too large
  ]
  for config, model in bad:
    with pytest.raises(Exception) as here:
      service.LocalInputs().prepare(config, None, model)
    with pytest.raises(Exception) as there:
      process.prepare(config, None, model)
    assert type(there.value) is type(here.value) and str(there.value) == str(here.value)
  good = pipeline.DatasetConfig('stdlib_lm', {'targets': 64}, batch_size=4)
  prepared = process.prepare(good, good.__class__(**{**good.__dict__, 'split': 'nope'}), DEC)
  with pytest.raises(errors.DataError, match="split 'nope'"):  # raised when train() asks
    prepared.check_eval()
  it = process.iterator(good, DEC)
  next(it)
  other = {**it.state(), 'seed': 99}
  with pytest.raises(errors.DataError, match='another pipeline'):
    it.restore(other)


def test_unknown_error_classes_and_a_dead_process():
  """An error whose class this process has not imported arrives as InputProcessError with
  the input process's traceback; a dead input process is one clear error, not a hang."""
  desc = service.describe(ValueError('plain'))
  assert isinstance(service.rebuild(desc), ValueError)
  desc = {**desc, 'module': 'tensorflow.python.framework.errors_impl',
          'name': 'InvalidArgumentError', 'message': 'bad record'}
  if desc['module'] not in sys.modules:
    err = service.rebuild(desc)
    assert isinstance(err, service.InputProcessError) and 'bad record' in str(err)
  p = service.InputProcess()
  try:
    os.kill(p._proc.pid, signal.SIGKILL)  # pylint: disable=protected-access
    p._proc.wait()  # pylint: disable=protected-access
    with pytest.raises(service.InputProcessError, match='ended unexpectedly'):
      p.prepare(CASES['decoder packed'][0], None, DEC)
  finally:
    p.close()


def test_train_process_imports_no_tensorflow():
  """The trainer's imports and the shipped pretraining run files import no TensorFlow
  or seqio (the input process does), and `take` picks the input process only then."""
  code = '\n'.join([
      'import sys',
      'from t5x_like import train, gin_utils',
      'gin_utils.parse(["runs/bench_maxtext.gin"], [])',
      'gin_utils.parse(["models/llama/tiny.gin", "runs/pretrain.gin"], '
      '["MIXTURE_OR_TASK_NAME = \'stdlib_lm\'", "TASK_FEATURE_LENGTHS = {\'targets\': 32}", '
      '"TRAIN_STEPS = 1", "MODEL_DIR = \'/tmp/x\'"])',
      'print(sorted(m for m in ("tensorflow", "seqio") if m in sys.modules))'])
  out = subprocess.run([sys.executable, '-c', code], cwd=tu.ROOT, env=tu.subprocess_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == '[]'


def _steps(model_dir):
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [(r['step'], r['batch_hash'], r['loss']) for r in records if 'batch_hash' in r]


def test_command_line_trains_the_same_with_and_without_it(tmp_path):
  """`python -m train` (input process, the default) and T5X_LIKE_INPUT_PROCESS=0 (in
  process) train on the same batches to the same losses, bit for bit, the default
  run's process never imports TensorFlow, and both turn the garbage collector back on
  after start-up (xla_env.pause_gc)."""
  runs = {}
  for flag in ('1', '0'):
    model_dir = str(tmp_path / f'run{flag}')
    env = {**tu.subprocess_env(), service.ENV: flag}
    env.pop('T5X_LIKE_XLA_DEFAULTS', None)  # (the defaults, the collector's pause among them)
    cmd = tu.train_command(model_dir, 3, 32)
    code = ('import runpy, sys, atexit\n'
            'import gc\n'
            'atexit.register(lambda: print("TF", "tensorflow" in sys.modules, "GC", '
            'gc.isenabled(), flush=True))\n'
            f'sys.argv = ["train"] + {cmd[3:]!r}\n'
            'runpy.run_module("train", run_name="__main__")\n')
    out = subprocess.run([sys.executable, '-c', code], cwd=tu.ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # (the garbage collector, paused for start-up by `python -m train`, is on again)
    assert f'TF {flag == "0"} GC True' in out.stdout, out.stdout[-2000:]
    runs[flag] = _steps(model_dir)
  assert len(runs['1']) == 3 and runs['1'] == runs['0']


@pytest.mark.parametrize('case', ['decoder packed', 'prefix lm unpacked', 'span corruption'])
def test_predicted_shapes_are_the_pipelines(case):
  """The shapes the trainer compiles with before the input process answers are the
  pipeline's, for every converter it predicts (packed and not)."""
  config, model = CASES[case]
  for pack in (True, False):
    c = config.__class__(**{**config.__dict__, 'pack': pack})
    assert pipeline.predicted_shapes(c, model) == pipeline.batch_shapes(c, model)
  assert pipeline.predicted_shapes(*CASES['dpo pairs']) is None


def test_train_with_a_wrong_prediction_rebuilds(tmp_path, monkeypatch):
  """train(input_process=True) from Python, with the prediction made wrong (no packing
  features): the trainer is built again from the input process's answer, and the run
  is step for step the in-process run (batch hashes and losses)."""
  from t5x_like import train as train_lib  # pylint: disable=g-import-not-at-top

  def run(name, *extra):
    model_dir = str(tmp_path / name)
    train_lib.run(['models/llama/tiny.gin', 'runs/pretrain.gin'], [
        "MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
        'TRAIN_STEPS = 2', f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 8', 'WARMUP_STEPS = 1',
        'train_lib.train.eval_split = None', 'train_lib.train.peak_flops = 1e11', *extra])
    return _steps(model_dir)

  real = pipeline.predicted_shapes
  calls = []

  def wrong(config, model):
    calls.append(config)
    shapes = real(config, model)
    return {k: v for k, v in shapes.items() if not k.endswith(('_segment_ids', '_positions'))}

  monkeypatch.setattr(pipeline, 'predicted_shapes', wrong)
  remote = run('remote', 'train_lib.train.input_process = True')
  assert calls  # (the input process path asked for a prediction)
  local = run('local', 'train_lib.train.input_process = False')
  assert len(remote) == 2 and remote == local


def test_input_process_malloc_settings(monkeypatch):
  """The input process gets at most 2 malloc arenas and none of the trainer's huge-page
  tunable; a user's own MALLOC_ARENA_MAX and other tunables stay; nothing without defaults."""
  env = {'GLIBC_TUNABLES': f'glibc.malloc.tcache_count=4:{xla_env.HUGETLB}'}
  assert service._malloc_env(env) == {'MALLOC_ARENA_MAX': '2',  # pylint: disable=protected-access
                                      'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=4'}
  assert service._malloc_env({'MALLOC_ARENA_MAX': '8'}) == {}  # pylint: disable=protected-access
  monkeypatch.setenv('T5X_LIKE_XLA_DEFAULTS', '0')
  assert service._malloc_env(env) == {}  # pylint: disable=protected-access
