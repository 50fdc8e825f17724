"""`python -m eval --gin_file=...`: evaluate checkpoints (see t5x_like/evaluate.py)."""

# Before anything heavy is imported: a SIGTERM during start-up is a request to stop.
from t5x_like import signals

signals.install()

from t5x_like.evaluate import console_main  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  console_main()
