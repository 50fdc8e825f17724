"""seqio tasks over the embedded corpus, preprocessors and the input pipeline."""
