"""EMOPortraits reenactment by speech, by video, and by both (neuralhead.emoportraits.reenact).

Tiny random models saved as training runs would save them; tracking runs mediapipe on the
public-domain astronaut portrait (scikit-image), the sound is a synthetic tone.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from neuralhead.cli import main
from neuralhead.emoportraits.audio_encoder import SpeechEncoderConfig, SpeechExpressionEncoder
from neuralhead.emoportraits.config import preset
from neuralhead.emoportraits.latent_space import ExpressionPCA
from neuralhead.emoportraits.reenact import MOUTH_BASIS_FILE, pose_from_vector, reenact
from neuralhead.emoportraits.rotation_generator import RotationGenerator, rotation_preset
from neuralhead.errors import InputError
from neuralhead.media.audio import load_audio, write_wav
from neuralhead.media.video import VideoWriter, is_marked_synthetic, probe_video
from neuralhead.megaportraits.base_model import MegaPortraitsBase

AUDIO_SECONDS = 0.5
EMBEDDER = "substitute:40"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("emoportraits_reenact")
    portrait = skimage.data.astronaut()
    source = cv2.resize(portrait, (256, 256), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "source.png"), source[:, :, ::-1])
    rate = 16000
    t = np.arange(int(AUDIO_SECONDS * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    write_wav(root / "speech.wav", tone, rate)
    face = portrait[0:320, 80:400]
    with VideoWriter(root / "driving.mp4", 25, synthetic=False) as writer:
        for i in range(4):
            move = cv2.getRotationMatrix2D((160, 160), 3.0 * i, 1.0)
            frame = cv2.warpAffine(face, move, (320, 320), borderMode=cv2.BORDER_REPLICATE)
            writer.write(cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA))
    torch.manual_seed(0)
    config = preset("emoportraits-tiny")
    MegaPortraitsBase(config).save_pretrained(root / "run" / "emoportraits")
    speech = SpeechExpressionEncoder(
        SpeechEncoderConfig(
            audio_dim=40, expression_dim=config.expression_dim, hidden_dim=16, embedder=EMBEDDER
        )
    )
    speech.save_pretrained(root / "speech_run" / "speech")
    ExpressionPCA.fit(torch.randn(64, config.expression_dim)).save(
        root / "speech_run" / "speech" / MOUTH_BASIS_FILE
    )
    rotation = RotationGenerator(rotation_preset("rotation-tiny", audio_dim=40, embedder=EMBEDDER))
    rotation.save_pretrained(root / "rotation_run" / "rotation")
    return {
        "root": root,
        "source": root / "source.png",
        "audio": root / "speech.wav",
        "driving": root / "driving.mp4",
        "run": root / "run",
        "speech": root / "speech_run",
        "rotation": root / "rotation_run",
    }


def test_audio_only_video_lasts_as_long_as_the_audio_and_carries_it(files, tmp_path):
    out = tmp_path / "speech.mp4"
    result = reenact(
        files["run"],
        files["source"],
        out,
        audio=files["audio"],
        speech_model=files["speech"],
        rotation_model=files["rotation"],
        smoothing=1.0,
        progress=False,
    )
    expected = math.ceil(AUDIO_SECONDS * 25)
    info = probe_video(out)
    assert result.num_frames == expected and info.num_frames == expected
    assert info.has_audio and result.has_audio and is_marked_synthetic(out)
    assert abs(info.num_frames / info.fps - AUDIO_SECONDS) < 1 / 25
    sound = load_audio(out, 16000)
    assert abs(len(sound) / 16000 - AUDIO_SECONDS) < 0.1
    assert "head motion from speech" in result.motion


def test_audio_only_without_a_rotation_model_keeps_the_photo_pose(files, tmp_path):
    result = reenact(
        files["run"],
        files["source"],
        tmp_path / "still.mp4",
        audio=files["audio"],
        speech_model=files["speech"],
        yaw=10.0,
        fps=10.0,
        progress=False,
    )
    assert (
        result.num_frames == math.ceil(AUDIO_SECONDS * 10) and "photo's head pose" in result.motion
    )


def test_video_and_audio_take_the_frames_of_the_video_and_the_mouth_of_the_audio(files, tmp_path):
    result = reenact(
        files["run"],
        files["source"],
        tmp_path / "both.mp4",
        driving_video=files["driving"],
        audio=files["audio"],
        speech_model=files["speech"],
        progress=False,
    )
    assert result.num_frames == 4 and result.has_audio
    assert "mouth components from speech" in result.motion


def test_video_only_is_megaportraits_reenactment(files, tmp_path):
    result = reenact(
        files["run"],
        files["source"],
        tmp_path / "video.mp4",
        driving_video=files["driving"],
        max_frames=2,
        progress=False,
    )
    assert result.num_frames == 2


def test_mode_errors(files, tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(InputError, match="driving video, an audio file, or both"):
        reenact(files["run"], files["source"], out)
    with pytest.raises(InputError, match="needs a speech encoder"):
        reenact(files["run"], files["source"], out, audio=files["audio"])
    with pytest.raises(InputError, match="head follows the video"):
        reenact(
            files["run"],
            files["source"],
            out,
            driving_video=files["driving"],
            rotation_model=files["rotation"],
        )
    with pytest.raises(InputError, match="apply to video driving"):
        reenact(
            files["run"],
            files["source"],
            out,
            audio=files["audio"],
            speech_model=files["speech"],
            motion="absolute",
        )
    with pytest.raises(InputError, match="trained on 40-d audio embeddings"):
        reenact(
            files["run"],
            files["source"],
            out,
            audio=files["audio"],
            speech_model=files["speech"],
            audio_embedder="substitute:32",
            progress=False,
        )
    with pytest.raises(InputError, match="not a speech encoder"):
        reenact(
            files["run"],
            files["source"],
            out,
            audio=files["audio"],
            speech_model=files["rotation"],
            progress=False,
        )


def test_pose_from_vector_matches_the_head_pose_network(files):
    model = MegaPortraitsBase(preset("emoportraits-tiny")).eval()
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        network = model.head_pose(image)
        converted = pose_from_vector(model, model.head_pose.predict(image))
    for key in ("rotation", "translation", "scale", "log_scale"):
        torch.testing.assert_close(converted[key], network[key])


def test_cli_drives_by_audio(files, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    args = [
        "reenact",
        "--checkpoint",
        str(files["run"]),
        "--source",
        str(files["source"]),
        "--audio",
        str(files["audio"]),
        "--out",
        str(out),
    ]
    assert (
        main(
            [
                *args,
                "--speech-model",
                str(files["speech"]),
                "--rotation-model",
                str(files["rotation"]),
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out and probe_video(out).has_audio
    assert main(args) == 2
    assert "needs a speech encoder" in capsys.readouterr().err
    assert main([*args, "--speech-model", str(files["speech"]), "--enhancer", "e"]) == 2
    assert "--enhancer only apply to MegaPortraits checkpoints" in capsys.readouterr().err


def test_benchmark_times_speech_driving_per_frame_of_a_window():
    from neuralhead.benchmark import SPEECH_WINDOW, _model_and_inputs

    net, inputs = _model_and_inputs("emoportraits-speech", 512, 1, torch.device("cpu"))
    assert net.frames_per_call == SPEECH_WINDOW
    with torch.inference_mode():
        out = net(**inputs)
    assert out.shape == (SPEECH_WINDOW, 128 + 9) and torch.isfinite(out).all()
    with pytest.raises(InputError, match="batch 1"):
        _model_and_inputs("emoportraits-speech", 512, 2, torch.device("cpu"))
