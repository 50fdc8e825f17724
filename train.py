"""`python -m train --gin_file=...`: the training entry (see t5x_like/train.py)."""

# Before anything heavy is imported: a SIGTERM during start-up is a request to stop.
import sys

if __name__ == '__main__' and any(a in ('-h', '--help') for a in sys.argv[1:]):
  from t5x_like import flags  # the standard library only: --help answers before jax loads
  flags.print_help_and_exit('train')

from t5x_like import xla_env  # pylint: disable=g-import-not-at-top,wrong-import-position

xla_env.apply()  # XLA options, before the backend starts

from t5x_like import signals  # pylint: disable=g-import-not-at-top,wrong-import-position

signals.install()

from t5x_like.train import console_main  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  console_main()
