"""TensorFlow for tf.data (under seqio), imported quietly and set up once.

Every module that uses TensorFlow or seqio imports this module first:

    from t5x_like.data import tf_setup  # pylint: disable=unused-import  (before seqio)

The package itself does not, so that `t5x_like.data.pipeline`'s configuration
classes and `t5x_like.data.errors` import without TensorFlow: a training
process whose data come from the input process (`service.py`) never imports it.
"""

import os
import re
import sys
import tempfile

# TensorFlow (tf.data, under seqio) runs on the CPU only. It is imported here first, quietly: its CUDA probing
# writes to file descriptor 2 from C++ static initialisers and device set-up
# that TF_CPP_MIN_LOG_LEVEL does not reach ("Could not find cuda drivers ...",
# "failed call to cuInit ..."), and on CPUs with AVX-512 it announces its oneDNN
# kernels (which change nothing for tf.data's integer work). Those lines are
# dropped; anything else it writes is passed on. Its GPUs are hidden, so it never
# takes memory from JAX.
_TF_NOISE = re.compile(
    r'All log messages before absl::InitializeLog\(\) is called are written to STDERR'
    r'|cudart_stub\.cc.*Could not find cuda drivers'
    r'|cuda_platform\.cc.*failed call to cuInit'
    r'|cpu_feature_guard\.cc|To enable the following instructions:.*rebuild TensorFlow'
    r'|Unable to register cu(DNN|FFT|BLAS) factory'
    r'|TF-TRT Warning: Could not find TensorRT'
    r'|port\.cc.*oneDNN custom operations are on')

# Keras 3, which TensorFlow imports eagerly, imports IPython and matplotlib when they are
# installed, for notebook display and image galleries we never use: about 0.6 s of every
# launch on a 2-core machine. While TensorFlow imports, those two read as absent (keras
# treats both as optional); afterwards they import as usual. One already imported (a
# notebook's IPython) is left alone.
_OPTIONAL_FOR_KERAS = ('IPython', 'matplotlib')


def _import_tensorflow_quietly() -> None:
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  hidden = [name for name in _OPTIONAL_FOR_KERAS if name not in sys.modules]
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      for name in hidden:
        sys.modules[name] = None  # (an import of it raises ImportError)
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      try:
        tf.config.set_visible_devices([], 'GPU')
      except RuntimeError:  # TF's devices were set up already
        pass
    finally:
      for name in hidden:
        if name in sys.modules and sys.modules[name] is None:
          del sys.modules[name]
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors='replace').splitlines(True)
              if not _TF_NOISE.search(line)]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()


# AutoGraph rewrites every Python function tf.data traces (read its source, transform
# the syntax tree, load the result): seconds of each launch's first pipeline build. These
# seqio modules' functions branch and loop only on Python values (feature names, static
# shapes, options), so they are traced as written, saving about 0.7 s of the build. A
# function that did need AutoGraph would fail loudly there (a graph tensor refuses bool()
# and iteration), not compute something else. seqio.utils, whose packing loops over
# tensors, stays converted, as do all other modules (a task's own preprocessors).
AUTOGRAPH_SKIPPED = ('seqio.preprocessors', 'seqio.feature_converters', 'seqio.vocabularies')


def _skip_autograph(modules) -> None:
  try:  # (TensorFlow's rule table: pinned by setup.py's bounds; if it moves, nothing is skipped)
    from tensorflow.python.autograph.core import config  # pylint: disable=g-import-not-at-top
    rules = tuple(config.CONVERSION_RULES)
    new = tuple(config.DoNotConvert(m) for m in modules)
  except (ImportError, AttributeError):
    return
  config.CONVERSION_RULES = new + rules


_import_tensorflow_quietly()
if os.environ.get('T5X_LIKE_AUTOGRAPH_ALL') != '1':
  _skip_autograph(AUTOGRAPH_SKIPPED)
