"""`python -m train --gin_file=...`: the training entry (see t5x_like/train.py)."""

from t5x_like.train import console_main

if __name__ == '__main__':
  console_main()
