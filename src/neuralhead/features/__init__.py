"""Features computed from inputs before they reach a model: per-frame audio windows."""

from neuralhead.features.audio import (
    AudioFeatureExtractor,
    LogMelExtractor,
    MFCCExtractor,
    extract_features_from_file,
    frame_windows,
    get_audio_extractor,
    register_audio_extractor,
    registered_audio_extractors,
)

__all__ = [
    "AudioFeatureExtractor",
    "LogMelExtractor",
    "MFCCExtractor",
    "extract_features_from_file",
    "frame_windows",
    "get_audio_extractor",
    "register_audio_extractor",
    "registered_audio_extractors",
]
