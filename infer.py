"""`python -m infer --gin_file=...`: generate from or score a checkpoint (see t5x_like/infer.py)."""

# Before anything heavy is imported: --help, the XLA options, and a SIGTERM during
# start-up is a request to stop.
from t5x_like import flags

flags.start('infer', __name__)

from t5x_like.infer import console_main  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  console_main()
