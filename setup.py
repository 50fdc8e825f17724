"""t5x_like: a JAX-native research codebase for training large language models."""

import setuptools

setuptools.setup(
    name='t5x_like',
    version='0.1.0',
    description='Gin-configured Flax transformers, sharded training, seqio data.',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['t5x_like*', 'models*', 'partitioning*',
                                               'pallas_kernels*']),
    py_modules=['train', 'infer', 'eval'],
    package_data={'': ['*.gin', '*.json', '*.csv']},
    include_package_data=True,
    # Bounds: the lower bound of each is the version the test suite ran on.
    install_requires=[
        'jax>=0.10.2,<0.13',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'seqio>=0.0.20,<0.1',
        'tensorflow>=2.21,<2.22',  # seqio's tf.data pipelines
        'grain>=0.2.18,<0.3',
        'tensorflow-datasets>=4.9.10,<5',  # TFDS sources (t5x_like/data/sources.py)
        'array-record>=0.8.6,<0.9',  # ArrayRecord sources read through grain
        'gin-config>=0.5.0,<0.6',
        'sentencepiece>=0.2.0,<0.3',
        'tensorboardX>=2.6.2,<3',  # TensorBoard event files
        'safetensors>=0.8.0,<1',  # Hugging Face weights (t5x_like/hf.py)
        'tokenizers>=0.23.3,<1',  # Hugging Face tokenizer.json vocabularies
        'numpy>=2.0,<3',
        # JAX's and TensorFlow's extra dtypes. 0.7.0 takes 0.43 s to import under numpy 2
        # (0.6.0: 3 ms; its ufunc loop registration), in the trainer and again in the input
        # process, at every launch. Lift the cap once a release imports fast again
        # (`python -X importtime -c 'import ml_dtypes'`) or JAX or TensorFlow needs one.
        'ml_dtypes>=0.6.0,<0.7',
        'scipy>=1.10,<2',  # scaling-law fits (t5x_like/scaling.py)
        'matplotlib>=3.8,<4',  # sweep reports' plots (t5x_like/sweep.py)
        'filelock>=3.12,<4',  # JAX's size-capped compilation cache (t5x_like/xla_env.py)
    ],
    extras_require={
        'test': ['pytest>=8,<10', 'pytest-xdist>=3.8,<4',
                 # tests/notebooks: the notebooks executed in a Jupyter kernel
                 'nbclient>=0.10,<0.12', 'nbformat>=5.10,<6', 'ipykernel>=6.29,<8'],
    },
)
