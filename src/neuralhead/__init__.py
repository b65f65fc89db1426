"""neuralhead: neural head avatars in PyTorch.

Implements Dynamic Neural Portraits (``neuralhead.dnp``) together with the
face tracking, dataset preparation, training, inference, evaluation and
benchmarking machinery the other models build on.
"""

__version__ = "0.1.0"
