"""seqio tasks over the embedded corpus, preprocessors and the input pipeline."""

import os
import re
import sys
import tempfile

# TensorFlow (tf.data, under seqio) runs on the CPU only. Every module that uses
# it is in this package, so it is imported here first, quietly: its CUDA probing
# writes to file descriptor 2 from C++ static initialisers and device set-up
# that TF_CPP_MIN_LOG_LEVEL does not reach ("Could not find cuda drivers ...",
# "failed call to cuInit ..."). Those lines are dropped; anything else it
# writes is passed on. Its GPUs are hidden, so it never takes memory from JAX.
_TF_NOISE = re.compile(
    r'All log messages before absl::InitializeLog\(\) is called are written to STDERR'
    r'|cudart_stub\.cc.*Could not find cuda drivers'
    r'|cuda_platform\.cc.*failed call to cuInit'
    r'|cpu_feature_guard\.cc|To enable the following instructions:.*rebuild TensorFlow'
    r'|Unable to register cu(DNN|FFT|BLAS) factory'
    r'|TF-TRT Warning: Could not find TensorRT')


def _import_tensorflow_quietly() -> None:
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      try:
        tf.config.set_visible_devices([], 'GPU')
      except RuntimeError:  # TF's devices were set up already
        pass
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors='replace').splitlines(True)
              if not _TF_NOISE.search(line)]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()


_import_tensorflow_quietly()
