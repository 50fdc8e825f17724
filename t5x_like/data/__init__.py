"""seqio tasks over the embedded corpus, preprocessors and the input pipeline.

Importing the package imports no TensorFlow: the modules that use it (through
seqio or tf.data) import `tf_setup` first, which imports it quietly and sets it
up. `errors` and `pipeline`'s configuration classes are TensorFlow-free, so the
trainer can name them while its batches come from the input process
(`service.py`).
"""
