"""Every shipped gin file parses and builds; parameter counts match the formula."""

import glob
import os

import gin
import jax
import numpy as np
import pytest

from models import param_count
from models import peft
from t5x_like import gin_utils

MODEL_FILES = gin_utils.shipped_files('models')
RUN_FILES = gin_utils.shipped_files('runs')

# Published parameter counts of the architectures these configs reproduce.
PUBLISHED = {
    't5_1_1/small.gin': 76_961_152,  # google/t5-v1_1-small
    't5_1_1/base.gin': 247_577_856,  # google/t5-v1_1-base
    'bloom/560m.gin': 559_214_592,  # bigscience/bloom-560m
    'llama/1b.gin': 1_100_048_384,  # TinyLlama-1.1B
    'llama/7b.gin': 6_738_415_616,  # Llama-2-7b
    'mixtral/8x7b.gin': 46_702_792_704,  # mistralai/Mixtral-8x7B-v0.1
}


def _name(path):
  return os.path.relpath(path, os.path.join(gin_utils.GIN_DIR, 'models'))


def test_every_gin_file_says_what_it_is():
  paths = glob.glob(os.path.join(gin_utils.GIN_DIR, '**', '*.gin'), recursive=True)
  assert len(paths) > len(MODEL_FILES)
  for path in paths:
    with open(path) as f:
      first, rest = f.readline(), f.read()
    assert first.startswith('# ') and len(first) > 20, path
    assert 'from __gin__ import dynamic_registration' in rest, path


@pytest.mark.parametrize('path', MODEL_FILES, ids=_name)
def test_model_config_builds_and_counts(path):
  model = gin_utils.model_from_gin([path])
  lengths = {'inputs': 8, 'targets': 8}
  abstract = jax.eval_shape(lambda: model.init_variables(
      jax.random.PRNGKey(0), model.dummy_batch(1, lengths))['params'])
  built = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)))
  assert built == param_count.analytic_param_count(model.config)
  if _name(path) in PUBLISHED:
    assert built == PUBLISHED[_name(path)]


@pytest.mark.parametrize('run', RUN_FILES, ids=os.path.basename)
def test_run_files_parse_with_a_model(run):
  gin.clear_config()
  with open(run) as f:
    text = f.read()
  # Each run file's required inputs (binding a macro no file uses is an error).
  if 'infer_lib' in text or 'eval_lib' in text:  # read a checkpoint
    bindings = ["CHECKPOINT_PATH = '/tmp/unused'"]
    bindings += ["OUTPUT_FILE = '/tmp/unused.jsonl'"] if 'OUTPUT_FILE' in text else [
        "MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}"]
  else:
    bindings = ["MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
                'TRAIN_STEPS = 10', "MODEL_DIR = '/tmp/unused'"]
    bindings += [b for b in ("INITIAL_CHECKPOINT = '/tmp/unused'",
                             "DOMAIN_TASK = 'stdlib_prose_lm'", "REPLAY_TASK = 'stdlib_code_lm'")
                 if b.split()[0] in text]
  gin_utils.parse(['models/llama/tiny.gin', run], bindings)
  macro, value = bindings[0].split(' = ')
  assert repr(gin.query_parameter('%' + macro)) == value


def _write(tmp_path, text):
  path = tmp_path / 'bad.gin'
  path.write_text(text)
  return str(path)


def test_misspelled_parameter_names_file_line_and_suggestion(tmp_path):
  path = _write(tmp_path, "# Bad\nfrom __gin__ import dynamic_registration\n"
                "from models import config as model_config\n\n"
                "model_config.DecoderConfig.num_hedas = 4\n")
  gin.clear_config()
  with pytest.raises(gin_utils.GinError) as e:
    gin_utils.parse([path], [])
  msg = str(e.value)
  assert 'model_config.DecoderConfig.num_hedas' in msg and 'line 5' in msg and 'bad.gin' in msg
  assert 'did you mean model_config.DecoderConfig.num_heads?' in msg
  assert '\n' not in msg


def test_misspelled_configurable_suggests_name(tmp_path):
  path = _write(tmp_path, "# Bad\nfrom __gin__ import dynamic_registration\n"
                "from models import config as model_config\n"
                "model_config.DecoderConfg.emb_dim = 4\n")
  gin.clear_config()
  with pytest.raises(gin_utils.GinError, match=r'did you mean model_config.DecoderConfig\?'):
    gin_utils.parse([path], [])


def test_misspelled_override_on_the_command_line():
  gin.clear_config()
  with pytest.raises(gin_utils.GinError, match=r"in the binding 'model_config.DecoderConfig.emb_dmi = 8'; did you mean model_config.DecoderConfig.emb_dim\?"):
    gin_utils.parse(['models/llama/tiny.gin'], ['model_config.DecoderConfig.emb_dmi = 8'])


def test_missing_gin_file():
  with pytest.raises(gin_utils.GinError, match="gin file 'nope.gin' not found"):
    gin_utils.parse(['nope.gin'], [])


@pytest.mark.parametrize('peft_file', gin_utils.shipped_files('peft'), ids=os.path.basename)
def test_peft_files_build_on_a_model(peft_file):
  method = os.path.basename(peft_file)[:-len('.gin')]
  model_file = 'models/bloom/tiny.gin' if method == 'bitfit' else 'models/llama/tiny.gin'
  model = gin_utils.model_from_gin([model_file, peft_file])
  assert model.config.peft.method.value == ('lora' if method == 'qlora' else method)
  abstract = jax.eval_shape(lambda: model.init_variables(
      jax.random.PRNGKey(0), model.dummy_batch(1, {'targets': 8}))['params'])
  trained, _ = peft.split(abstract, model.trainable_pattern())
  assert peft.flat(trained)
