"""Malformed inputs, one table: each exits 2 with exactly one line on stderr that
starts with `error:`, names the input and the fix, and leaves MODEL_DIR as it
was (byte for byte) or absent.

A case is one row: (id, MODEL_DIR kind, extra command-line arguments, a regex
the error line must match). MODEL_DIR kinds: 'new' (absent), 'trained' (a copy
of a finished 4-step run with checkpoints at steps 2 and 4) or the name of a
setup function in SETUPS that damages or replaces a trained copy. The
arguments are added to a tiny LLaMA run on the embedded corpus; `{dir}`,
`{trained}` and `{tmp}` are filled in.

The table runs in-process (`console_main`, stderr captured at the file
descriptor); test_bad_input_as_a_process runs a few rows as real processes.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from t5x_like import train as train_lib

import testing_utils as tu

BASE = ['--gin_file=models/llama/tiny.gin', '--gin_file=runs/pretrain.gin',
        "--gin.MIXTURE_OR_TASK_NAME='stdlib_lm'", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
        '--gin.BATCH_SIZE=8', '--gin.WARMUP_STEPS=1', '--gin.train_lib.train.eval_steps=1',
        '--gin.train_lib.train.peak_flops=1e11', '--gin.train_lib.train.checkpoint_every=2']


def _gin_file(tmp, name, text):
  path = os.path.join(tmp, name)
  if text is None:
    os.makedirs(path, exist_ok=True)
  else:
    with open(path, 'w') as f:
      f.write(text)
  return path


CASES = [
    # --- flags and gin files -------------------------------------------------------------
    ('no_gin_file', 'new', ['!nobase'], r'no --gin_file given'),
    ('unknown_flag', 'new', ['--gin_fle=x.gin'], r'unrecognised arguments: --gin_fle=x.gin'),
    ('bad_num_processes', 'new', ['--num_processes=two'], r"--num_processes: invalid int value: 'two'"),
    ('missing_gin_file', 'new', ['--gin_file=nope.gin'], r"gin file 'nope.gin' not found"),
    ('gin_file_is_dir', 'new', ['--gin_file={tmp}/adir.gin'], r'adir.gin is a directory: pass a .gin file'),
    ('include_loop', 'new', ['--gin_file={tmp}/loop_a.gin'],
     r'gin include loop: loop_a.gin -> loop_b.gin -> loop_a.gin: remove one'),
    ('gin_syntax', 'new', ['--gin_file={tmp}/syntax.gin'], r'cannot parse gin.*syntax.gin.*fix the syntax'),
    ('missing_include', 'new', ['--gin_file={tmp}/missinc.gin'],
     r"gin include 'nope.gin'.*not found.*--gin_search_path"),
    ('override_without_value', 'new', ['--gin.TRAIN_STEPS'], r'--gin.TRAIN_STEPS: write gin overrides as --gin.KEY=value'),
    ('override_empty_value', 'new', ['--gin.TRAIN_STEPS='], r"binding 'TRAIN_STEPS =' has no value: write --gin.TRAIN_STEPS=VALUE"),
    ('override_unbalanced', 'new', ['--gin.TRAIN_STEPS=10)'], r"cannot parse the binding 'TRAIN_STEPS = 10\)'"),
    ('override_unclosed', 'new', ['--gin.MESH_SHAPE=(1,'], r"cannot parse the binding 'MESH_SHAPE = \(1,'.*close brackets"),
    ('unquoted_string', 'new', ['--gin.MIXTURE_OR_TASK_NAME=stdlib lm'], r"cannot parse the binding 'MIXTURE_OR_TASK_NAME = stdlib lm'.*quote strings"),
    # --- macros --------------------------------------------------------------------------
    ('macro_typo_batch', 'new', ['--gin.BATCH_SIZ=4'], r'unknown gin macro BATCH_SIZ .*did you mean BATCH_SIZE\?'),
    ('macro_typo_steps', 'new', ['--gin.TRAIN_STEP=10'], r'unknown gin macro TRAIN_STEP .*did you mean TRAIN_STEPS\?'),
    ('macro_typo_lr', 'new', ['--gin.LEARNING_RATES=1e-3'], r'did you mean LEARNING_RATE\?'),
    ('macro_typo_warmup', 'new', ['--gin.WARMUP=3'], r'unknown gin macro WARMUP .*did you mean WARMUP_STEPS\?'),
    ('macro_typo_seed', 'new', ['--gin.DATASEED=3'], r'did you mean DATA_SEED\?'),
    ('macro_lowercase', 'new', ["--gin.model_dir='{dir}'"], r'unknown gin macro model_dir .*did you mean MODEL_DIR\?'),
    ('macro_unknown', 'new', ['--gin.NUM_GPUS=8'], r'unknown gin macro NUM_GPUS .*no gin file defines or uses it'),
    ('macro_never_bound', 'new', ['--gin.train_lib.train.seed=%SEED'], r'gin macro SEED is used \(%SEED\) but never bound'),
    ('macro_required_unset', 'new', ['!nosteps'], r'required gin macro TRAIN_STEPS is not set: pass --gin.TRAIN_STEPS='),
    # --- configurables and parameters ----------------------------------------------------
    ('param_typo_train', 'new', ['--gin.train_lib.train.checkpoint_evry=5'], r'did you mean train_lib.train.checkpoint_every\?'),
    ('param_typo_model', 'new', ['--gin.model_config.DecoderConfig.num_hedas=2'], r'did you mean model_config.DecoderConfig.num_heads\?'),
    ('param_typo_data', 'new', ['--gin.pipeline.DatasetConfig.shufle=False'], r'did you mean pipeline.DatasetConfig.shuffle\?'),
    ('param_typo_schedule', 'new', ['--gin.optimizers.warmup_cosine.peak_valu=1.0'], r'did you mean optimizers.warmup_cosine.peak_value\?'),
    ('param_typo_adamw', 'new', ['--gin.optimizers.adamw.beta1=0.9'], r'unknown gin binding optimizers.adamw.beta1'),
    ('configurable_typo_function', 'new', ['--gin.train_lib.trian.seed=1'], r'unknown gin configurable train_lib.trian.*did you mean train_lib.train\?'),
    ('configurable_typo_class', 'new', ['--gin.model_config.DecoderConfg.num_heads=2'], r'did you mean model_config.DecoderConfig\?'),
    ('configurable_typo_optimizer', 'new', ['--gin.optimizers.adamww.b1=0.9'], r'did you mean optimizers.adamw\?'),
    ('module_typo', 'new', ['--gin.optimizer.adamw.b1=0.9'], r'did you mean optimizers.adamw\?'),
    ('reference_typo', 'new', ['--gin.train_lib.train.optimizer=@optimizers.adamx()'], r'unknown gin configurable optimizers.adamx.*did you mean optimizers.adamw\?'),
    ('reference_typo_model', 'new', ['--gin.MODEL=@model_lib.DecoderOnlyModl()'], r'did you mean model_lib.DecoderOnlyModel\?'),
    ('unknown_task', 'new', ["--gin.MIXTURE_OR_TASK_NAME='stdlib_lmm'"], r"unknown mixture or task 'stdlib_lmm': did you mean stdlib_lm"),
    ('task_not_a_string', 'new', ['--gin.MIXTURE_OR_TASK_NAME=3'], r'MIXTURE_OR_TASK_NAME=3 must be the name of a seqio task'),
    # --- step counts and periods ---------------------------------------------------------
    ('steps_zero', 'new', ['--gin.TRAIN_STEPS=0'], r'TRAIN_STEPS=0 must be a positive integer: set TRAIN_STEPS'),
    ('steps_negative', 'new', ['--gin.TRAIN_STEPS=-5'], r'TRAIN_STEPS=-5 must be a positive integer'),
    ('steps_fraction', 'new', ['--gin.TRAIN_STEPS=3.5'], r'TRAIN_STEPS=3.5 must be a positive integer'),
    ('steps_float', 'new', ['--gin.TRAIN_STEPS=1e3'], r'TRAIN_STEPS=1000.0 must be a positive integer'),
    ('steps_string', 'new', ["--gin.TRAIN_STEPS='ten'"], r"TRAIN_STEPS='ten' must be a positive integer"),
    ('steps_bool', 'new', ['--gin.TRAIN_STEPS=True'], r'TRAIN_STEPS=True must be a positive integer'),
    ('steps_none', 'new', ['--gin.TRAIN_STEPS=None'], r'TRAIN_STEPS=None must be a positive integer'),
    ('checkpoint_every_zero', 'new', ['--gin.train_lib.train.checkpoint_every=0'], r'train_lib.train.checkpoint_every=0 must be a positive integer'),
    ('checkpoint_every_negative', 'new', ['--gin.train_lib.train.checkpoint_every=-1'], r'checkpoint_every=-1 must be a positive integer'),
    ('checkpoint_every_fraction', 'new', ['--gin.train_lib.train.checkpoint_every=2.5'], r'checkpoint_every=2.5 must be a positive integer'),
    ('checkpoint_every_string', 'new', ["--gin.train_lib.train.checkpoint_every='x'"], r"checkpoint_every='x' must be a positive integer"),
    ('keep_checkpoints_zero', 'new', ['--gin.train_lib.train.keep_checkpoints=0'], r'keep_checkpoints=0 must be a positive integer'),
    ('keep_period_zero', 'new', ['--gin.train_lib.train.keep_period=0'], r'keep_period=0 must be a positive integer.*or None'),
    ('log_every_zero', 'new', ['--gin.train_lib.train.log_every=0'], r'log_every=0 must be a positive integer'),
    ('log_every_negative', 'new', ['--gin.train_lib.train.log_every=-2'], r'log_every=-2 must be a positive integer'),
    ('eval_every_negative', 'new', ['--gin.train_lib.train.eval_every=-1'], r'eval_every=-1 must be a non-negative integer'),
    ('eval_steps_zero', 'new', ['--gin.train_lib.train.eval_steps=0'], r'eval_steps=0 must be a positive integer.*eval_split = None'),
    ('eval_split_unknown', 'new', ["--gin.train_lib.train.eval_split='valdation'"], r"split 'valdation' is not one of .*train_lib.train.eval_split"),
    ('eval_split_number', 'new', ['--gin.train_lib.train.eval_split=3'], r'eval_split=3 must be a split name'),
    ('microbatches_zero', 'new', ['--gin.train_lib.train.num_microbatches=0'], r'num_microbatches=0 must be a positive integer'),
    ('microbatches_indivisible', 'new', ['--gin.train_lib.train.num_microbatches=3'], r'(?i)batch.*8.*microbatches.*3|3.*microbatch'),
    ('seed_fraction', 'new', ['--gin.train_lib.train.seed=1.5'], r'train_lib.train.seed=1.5 must be an integer'),
    ('warmup_negative', 'new', ['--gin.WARMUP_STEPS=-1'], r'WARMUP_STEPS=-1 must be a non-negative integer'),
    ('warmup_fraction', 'new', ['--gin.WARMUP_STEPS=2.5'], r'WARMUP_STEPS=2.5 must be a non-negative integer'),
    ('warmup_too_long', 'new', ['--gin.TRAIN_STEPS=4', '--gin.WARMUP_STEPS=10'], r'TRAIN_STEPS=4 must exceed WARMUP_STEPS=10'),
    # --- optimizer -----------------------------------------------------------------------
    ('lr_negative', 'new', ['--gin.LEARNING_RATE=-1e-3'], r'LEARNING_RATE=-0.001 must be a finite number in \[0, inf\)'),
    ('lr_infinite', 'new', ['--gin.LEARNING_RATE=1e999'], r'LEARNING_RATE=inf must be a finite number'),
    ('lr_string', 'new', ["--gin.LEARNING_RATE='fast'"], r"LEARNING_RATE='fast' must be a finite number"),
    ('lr_constant_negative', 'new', ['--gin.optimizers.adamw.learning_rate=-0.1'], r'optimizers.adamw.learning_rate=-0.1 must be a finite number'),
    ('weight_decay_negative', 'new', ['--gin.WEIGHT_DECAY=-0.1'], r'WEIGHT_DECAY=-0.1 must be a finite number in \[0, inf\)'),
    ('weight_decay_infinite', 'new', ['--gin.WEIGHT_DECAY=1e999'], r'WEIGHT_DECAY=inf must be a finite number'),
    ('weight_decay_string', 'new', ["--gin.WEIGHT_DECAY='none'"], r"WEIGHT_DECAY='none' must be a finite number"),
    ('b1_above_one', 'new', ['--gin.optimizers.adamw.b1=1.5'], r'optimizers.adamw.b1=1.5 must be a finite number in \[0, 1\)'),
    ('b1_negative', 'new', ['--gin.optimizers.adamw.b1=-0.1'], r'optimizers.adamw.b1=-0.1 must be a finite number in \[0, 1\)'),
    ('b2_one', 'new', ['--gin.optimizers.adamw.b2=1.0'], r'optimizers.adamw.b2=1.0 must be a finite number in \[0, 1\)'),
    ('eps_negative', 'new', ['--gin.optimizers.adamw.eps=-1e-8'], r'optimizers.adamw.eps=-1e-08 must be a finite number'),
    ('clip_negative', 'new', ['--gin.optimizers.adamw.clip_norm=-1.0'], r'optimizers.adamw.clip_norm=-1.0 must be a finite number in \(0, inf\).*or None'),
    ('clip_zero', 'new', ['--gin.optimizers.adamw.clip_norm=0'], r'optimizers.adamw.clip_norm=0 must be a finite number in \(0, inf\)'),
    ('end_ratio_above_one', 'new', ['--gin.optimizers.warmup_cosine.end_ratio=1.5'], r'optimizers.warmup_cosine.end_ratio=1.5 must be a finite number in \[0, 1\]'),
    ('end_ratio_negative', 'new', ['--gin.optimizers.warmup_cosine.end_ratio=-0.5'], r'end_ratio=-0.5 must be a finite number'),
    ('decay_steps_fraction', 'new', ['--gin.optimizers.warmup_cosine.decay_steps=7.5'], r'optimizers.warmup_cosine.decay_steps=7.5 must be a positive integer'),
    # --- data ----------------------------------------------------------------------------
    ('batch_zero', 'new', ['--gin.BATCH_SIZE=0'], r'BATCH_SIZE=0 must be a positive integer'),
    ('batch_negative', 'new', ['--gin.BATCH_SIZE=-8'], r'BATCH_SIZE=-8 must be a positive integer'),
    ('batch_float', 'new', ['--gin.BATCH_SIZE=8.0'], r'BATCH_SIZE=8.0 must be a positive integer'),
    ('batch_string', 'new', ["--gin.BATCH_SIZE='eight'"], r"BATCH_SIZE='eight' must be a positive integer"),
    ('batch_indivisible', 'new', ['--gin.BATCH_SIZE=6'], r'batch size 6 is not divisible by the data-parallel size 8'),
    ('data_seed_string', 'new', ["--gin.DATA_SEED='x'"], r"DATA_SEED='x' must be an integer"),
    ('data_seed_fraction', 'new', ['--gin.DATA_SEED=1.5'], r'DATA_SEED=1.5 must be an integer'),
    ('lengths_zero', 'new', ["--gin.TASK_FEATURE_LENGTHS={'targets': 0}"], r"TASK_FEATURE_LENGTHS\['targets'\]=0 must be a positive integer"),
    ('lengths_negative', 'new', ["--gin.TASK_FEATURE_LENGTHS={'targets': -1}"], r"TASK_FEATURE_LENGTHS\['targets'\]=-1 must be a positive integer"),
    ('lengths_fraction', 'new', ["--gin.TASK_FEATURE_LENGTHS={'targets': 32.5}"], r"TASK_FEATURE_LENGTHS\['targets'\]=32.5 must be a positive integer"),
    ('lengths_typo', 'new', ["--gin.TASK_FEATURE_LENGTHS={'tagrets': 32}"], r"task feature length 'tagrets' is not a feature of 'stdlib_lm'"),
    ('lengths_empty', 'new', ['--gin.TASK_FEATURE_LENGTHS={}'], r'TASK_FEATURE_LENGTHS=\{\} must map feature names to lengths'),
    ('lengths_not_a_dict', 'new', ['--gin.TASK_FEATURE_LENGTHS=32'], r'TASK_FEATURE_LENGTHS=32 must map feature names'),
    ('lengths_inputs_for_decoder_only', 'new', ["--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}"], r"'inputs' is not a feature of 'stdlib_lm'"),
    ('shuffle_not_bool', 'new', ["--gin.pipeline.DatasetConfig.shuffle='yes'"], r"pipeline.DatasetConfig.shuffle='yes' must be True or False"),
    # --- model ---------------------------------------------------------------------------
    ('dropout_one', 'new', ['--gin.model_config.DecoderConfig.dropout_rate=1.0'], r'dropout_rate=1.0 must be in \[0, 1\)'),
    ('dropout_negative', 'new', ['--gin.model_config.DecoderConfig.dropout_rate=-0.1'], r'dropout_rate=-0.1 must be in \[0, 1\)'),
    ('emb_dim_zero', 'new', ['--gin.model_config.DecoderConfig.emb_dim=0'], r'emb_dim=0 must be at least 1'),
    ('num_heads_zero', 'new', ['--gin.model_config.DecoderConfig.num_heads=0'], r'num_heads=0 must be at least 1'),
    ('num_layers_zero', 'new', ['--gin.model_config.DecoderConfig.num_layers=0'], r'num_layers=0 must be at least 1'),
    ('kv_heads_indivisible', 'new', ['--gin.model_config.DecoderConfig.num_kv_heads=3'], r'num_heads=2 is not divisible by num_kv_heads=3'),
    ('vocab_too_small', 'new', ['--gin.model_config.DecoderConfig.vocab_size=100'], r'vocabulary has \d+ ids but the model vocab_size is 100: raise DecoderConfig.vocab_size'),
    ('dtype_unknown', 'new', ["--gin.model_config.DecoderConfig.dtype='float33'"], r"dtype='float33' is not a dtype"),
    ('position_encoding_unknown', 'new', ["--gin.model_config.DecoderConfig.position_encoding='rotary'"], r"position_encoding='rotary' is not one of"),
    ('learned_positions_too_short', 'new', ["--gin.model_config.DecoderConfig.position_encoding='learned'", '--gin.model_config.DecoderConfig.max_length=16'], r'sequence length 32 is longer than DecoderConfig.max_length=16'),
    # --- mesh ----------------------------------------------------------------------------
    ('mesh_too_big', 'new', ['--gin.MESH_SHAPE=(2, 2, 4)'], r'needs 16 devices but 8 are available'),
    ('mesh_indivisible', 'new', ['--gin.MESH_SHAPE=(3, 1, 1)'], r'mesh shape \(3, 1, 1, 1\) needs 3 devices but 8 are available: change MESH_SHAPE'),
    ('mesh_zero', 'new', ['--gin.MESH_SHAPE=(0, 1, 1)'], r'mesh shape \(0, 1, 1, 1\) has a size below 1: set MESH_SHAPE'),
    ('mesh_two_rest', 'new', ['--gin.MESH_SHAPE=(-1, -1, 1)'], r'(?i)mesh.*-1'),
    # --- train() switches ----------------------------------------------------------------
    ('peak_flops_zero', 'new', ['--gin.train_lib.train.peak_flops=0'], r'peak_flops=0 must be a finite number in \(0, inf\)'),
    ('peak_flops_negative', 'new', ['--gin.train_lib.train.peak_flops=-1.0'], r'peak_flops=-1.0 must be a finite number'),
    ('async_not_bool', 'new', ['--gin.train_lib.train.async_checkpointing=1'], r'async_checkpointing=1 must be True or False'),
    ('spike_not_policy', 'new', ['--gin.train_lib.train.spike_recovery=True'], r'spike_recovery=True must be @loop.SpikePolicy\(\) or None'),
    ('spike_factor', 'new', ['--gin.train_lib.train.spike_recovery=@loop.SpikePolicy()', '--gin.loop.SpikePolicy.factor=0.5'], r'SpikePolicy.factor=0.5 must be a finite number above 1'),
    ('spike_window', 'new', ['--gin.train_lib.train.spike_recovery=@loop.SpikePolicy()', '--gin.loop.SpikePolicy.window=0'], r'loop.SpikePolicy.window=0 must be a positive integer'),
    ('spike_retries', 'new', ['--gin.train_lib.train.spike_recovery=@loop.SpikePolicy()', '--gin.loop.SpikePolicy.max_rollbacks=0'], r'max_rollbacks=0 must be a positive integer'),
    ('spike_skip', 'new', ['--gin.train_lib.train.spike_recovery=@loop.SpikePolicy()', '--gin.loop.SpikePolicy.skip_batches=-1'], r'skip_batches=-1 must be a non-negative integer'),
    ('upcycle_without_initial', 'new', ['--gin.train_lib.train.initial_checkpoint_upcycle=True'], r'initial_checkpoint_upcycle = True needs train.initial_checkpoint'),
    ('initial_checkpoint_missing', 'new', ["--gin.train_lib.train.initial_checkpoint='{tmp}/nowhere'"], r'no checkpoint found at .*nowhere: set train.initial_checkpoint'),
    ('initial_checkpoint_of_other_model', 'new', ["--gin.train_lib.train.initial_checkpoint='{trained}'", '--gin.model_config.DecoderConfig.emb_dim=48'], r'has .* of shape .* but the model expects'),
    # --- MODEL_DIR -----------------------------------------------------------------------
    ('model_dir_empty', 'new', ["--gin.MODEL_DIR=''"], r"MODEL_DIR='' must name a directory: set MODEL_DIR"),
    ('model_dir_none', 'new', ['--gin.MODEL_DIR=None'], r'MODEL_DIR=None must name a directory'),
    ('model_dir_number', 'new', ['--gin.MODEL_DIR=3'], r'MODEL_DIR=3 must name a directory'),
    ('model_dir_is_file', 'file', [], r"MODEL_DIR='.*' is a file, not a directory: point MODEL_DIR at a directory"),
    ('model_dir_under_file', 'new', ["--gin.MODEL_DIR='{tmp}/plain/run'"], r'cannot be created: .*plain is a file; point MODEL_DIR elsewhere'),
    ('model_dir_read_only', 'new', ["--gin.MODEL_DIR='/sys/t5x_like_run'"], r"MODEL_DIR='/sys/t5x_like_run' (cannot be created|is not writable)"),
    # --- checkpoints ---------------------------------------------------------------------
    ('checkpoints_is_file', 'checkpoints_file', [], r'checkpoints is a file, not a directory: move it away'),
    ('junk_step_dir', 'junk_step', [], r'no checkpoint in .* verifies \(step 9: .*\): move the damaged'),
    ('all_checkpoints_flipped', 'all_bitflip', [], r'no checkpoint in .* verifies \(step 4: state/.*(CRC32|digest) mismatch'),
    ('all_metadata_garbage', 'all_metadata', [], r'no checkpoint in .* verifies \(step 4: state/_METADATA'),
    ('all_data_files_deleted', 'all_delete', [], r'no checkpoint in .* verifies \(step 4: '),
    ('checkpoint_other_width', 'trained', ['--gin.model_config.DecoderConfig.emb_dim=48'], r'checkpoint step 4 in .* has .* of shape .* but the model expects .*: point MODEL_DIR at a new directory'),
    ('checkpoint_other_depth', 'trained', ['--gin.model_config.DecoderConfig.num_layers=3'], r'checkpoint step 4 .* has .* of shape|has no'),
    ('checkpoint_other_dtype', 'trained', ["--gin.model_config.DecoderConfig.param_dtype='bfloat16'"], r'of dtype float32 but the model expects bfloat16'),
    ('checkpoint_other_vocab', 'trained', ['--gin.model_config.DecoderConfig.vocab_size=512'], r'checkpoint step 4 in .* has params/.* of shape \(32, 384\) but the model expects \(32, 512\)'),
    # --- data settings changed on resume ------------------------------------------------
    ('resume_other_data_seed', 'trained', ['--gin.DATA_SEED=1'], r'checkpointed data iterator was for another pipeline \(seed: checkpoint 0 vs now 1\).*allow_data_changes'),
    ('resume_other_batch', 'trained', ['--gin.BATCH_SIZE=16'], r'another pipeline \(batch_size: checkpoint 8 vs now 16\)'),
    ('resume_other_lengths', 'trained', ["--gin.TASK_FEATURE_LENGTHS={'targets': 64}"], r'another pipeline \(task_feature_lengths'),
    ('resume_other_task', 'trained', ["--gin.MIXTURE_OR_TASK_NAME='stdlib_code_lm'"], r'another pipeline \(.*mixture_or_task_name'),
]

SETUPS = {}


def _setup(fn):
  SETUPS[fn.__name__] = fn
  return fn


@_setup
def file(model_dir, trained):  # pylint: disable=unused-argument
  with open(model_dir, 'w') as f:
    f.write('not a directory\n')


@_setup
def checkpoints_file(model_dir, trained):  # pylint: disable=unused-argument
  os.makedirs(model_dir)
  with open(os.path.join(model_dir, 'checkpoints'), 'w') as f:
    f.write('x')


@_setup
def junk_step(model_dir, trained):  # pylint: disable=unused-argument
  os.makedirs(os.path.join(model_dir, 'checkpoints', '9'))
  with open(os.path.join(model_dir, 'checkpoints', '9', 'notes.txt'), 'w') as f:
    f.write('junk')


def _damage_all(kind):
  def setup(model_dir, trained):
    shutil.copytree(trained, model_dir)
    for step in (2, 4):
      tu.corrupt(model_dir, step, kind)
  return setup


for _kind in ('bitflip', 'metadata', 'delete'):
  SETUPS[f'all_{_kind}'] = _damage_all(_kind)


def snapshot(path):
  """Every file and folder under `path` with its bytes' digest; None if absent."""
  if not os.path.lexists(path):
    return None
  if not os.path.isdir(path):
    with open(path, 'rb') as f:
      return hashlib.sha256(f.read()).hexdigest()
  out = {}
  for d, dirs, files in os.walk(path):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), path)] = 'dir'
    for name in files:
      with open(os.path.join(d, name), 'rb') as f:
        out[os.path.relpath(os.path.join(d, name), path)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4."""
  model_dir = str(tmp_path_factory.mktemp('trained') / 'run')
  train_lib.run([a.split('=', 1)[1] for a in BASE[:2]],
                [a[len('--gin.'):].replace('=', ' = ', 1) for a in BASE[2:]] +
                ['TRAIN_STEPS = 4', f"MODEL_DIR = '{model_dir}'"])
  return model_dir


@pytest.fixture(scope='module')
def gin_dir(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp('gin'))
  _gin_file(tmp, 'loop_a.gin', "include 'loop_b.gin'\n")
  _gin_file(tmp, 'loop_b.gin', "include 'loop_a.gin'\n")
  _gin_file(tmp, 'syntax.gin', 'x = = 3\n')
  _gin_file(tmp, 'missinc.gin', "include 'nope.gin'\n")
  _gin_file(tmp, 'adir.gin', None)
  _gin_file(tmp, 'plain', 'a file\n')
  return tmp


def argv_for(case_args, model_dir, trained_dir, tmp):
  base = list(BASE)
  args = [a.replace('{dir}', model_dir).replace('{trained}', trained_dir).replace('{tmp}', tmp)
          for a in case_args]
  if '!nobase' in args:
    return [a for a in args if a != '!nobase']
  steps = [] if '!nosteps' in args else ['--gin.TRAIN_STEPS=8']
  args = [a for a in args if a != '!nosteps']
  model_dir_flag = [] if any(a.startswith('--gin.MODEL_DIR=') for a in args) else [
      f"--gin.MODEL_DIR='{model_dir}'"]
  return base + steps + model_dir_flag + args


def prepare(kind, tmp_path, trained_dir):
  model_dir = str(tmp_path / 'run')
  if kind == 'trained':
    shutil.copytree(trained_dir, model_dir)
  elif kind in SETUPS:
    SETUPS[kind](model_dir, trained_dir)
  return model_dir


@pytest.mark.parametrize('case_id,kind,args,pattern', CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, kind, args, pattern, tmp_path, trained, gin_dir, capfd):
  del case_id
  model_dir = prepare(kind, tmp_path, trained)
  before = snapshot(model_dir)
  argv = argv_for(args, model_dir, trained, gin_dir)
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    train_lib.console_main(argv)
  err = capfd.readouterr().err
  assert e.value.code == 2, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert re.search(pattern, lines[0]), (pattern, lines[0])
  assert snapshot(model_dir) == before
  if before is None:
    assert not os.path.lexists(model_dir)


def test_the_table_is_large_and_unique():
  assert len(CASES) >= 100
  assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize('case_id', ['macro_typo_batch', 'steps_fraction', 'all_checkpoints_flipped',
                                     'resume_other_data_seed'])
def test_bad_input_as_a_process(case_id, tmp_path, trained, gin_dir):
  """The same promise from a real `python -m train`: nothing else on stderr either
  (no CUDA probing, no absl or orbax warnings)."""
  _, kind, args, pattern = next(c for c in CASES if c[0] == case_id)
  model_dir = prepare(kind, tmp_path, trained)
  before = snapshot(model_dir)
  env = tu.subprocess_env(8)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # the entry itself keeps TensorFlow's probing quiet
  done = subprocess.run([sys.executable, '-m', 'train'] + argv_for(args, model_dir, trained, gin_dir),
                        cwd=tu.ROOT, env=env, capture_output=True, text=True)
  assert done.returncode == 2, done.stderr[-3000:]
  lines = [l for l in done.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert re.search(pattern, lines[0])
  assert snapshot(model_dir) == before
