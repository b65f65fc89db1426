"""Pretrained feature networks, defined in the project with the parameter names of their
published weight files so that those files load as they are.

Every network takes RGB images as float tensors in [0, 1] and applies its own input
normalisation. Importing this package registers every network's weight files with
:mod:`neuralhead.weights`.
"""

from neuralhead.nn import resnet  # noqa: F401
from neuralhead.pretrained import arcface, face_parser, gaze, i3d, vgg, vggface  # noqa: F401
