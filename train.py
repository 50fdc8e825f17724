"""`python -m train --gin_file=...`: the training entry (see t5x_like/train.py)."""

# Before anything heavy is imported: --help, the XLA options, and a SIGTERM during
# start-up is a request to stop.
from t5x_like import flags

flags.start('train', __name__)
if __name__ == '__main__':
  # The input pipeline's process starts now (t5x_like/data/service.py), so that it imports
  # TensorFlow and builds the pipeline while this one imports JAX and builds the model.
  from t5x_like.data import service  # pylint: disable=g-import-not-at-top,wrong-import-position
  service.prestart()

from t5x_like.train import console_main  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  console_main()
