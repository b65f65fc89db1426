"""Dynamic Neural Portraits (Doukas, Ploumpis, Zafeiriou, WACV 2023).

A person-specific video portrait: a 2D coordinate MLP conditioned on head pose, expression
and gaze (or audio) produces a feature map that a CNN decoder up-samples into the frame.
"""

from neuralhead.dnp.config import PRESETS, DNPConfig, preset
from neuralhead.dnp.model import DNPOutput, DynamicNeuralPortrait

__all__ = ["DNPConfig", "DNPOutput", "DynamicNeuralPortrait", "PRESETS", "preset"]
