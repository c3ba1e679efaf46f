"""STFT front-end, speech datasets (all three representations) and WAV folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from onnxzip.errors import ConfigError, DataError
from onnxzip.evaluators import SpeechDataset, Stft, load_dataset, read_wav


def _wave(length: int = 4000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, length)


@pytest.mark.parametrize("length", [1, 127, 4000, 4001])
def test_stft_round_trip_is_exact(length: int) -> None:
    stft = Stft(512, 128)
    wave = _wave(length)
    spectrum = stft.forward(wave)
    assert spectrum.shape == (stft.frames(length), 257)
    np.testing.assert_allclose(stft.inverse(spectrum, length), wave, atol=1e-10)


def test_stft_matches_its_formula() -> None:
    stft = Stft(16, 4)
    wave = _wave(64)
    padded = np.concatenate([np.zeros(8), wave, np.zeros(64)])
    frame = 5
    expected = np.fft.rfft(padded[frame * 4 : frame * 4 + 16] * stft.window)
    np.testing.assert_allclose(stft.forward(wave)[frame], expected)
    with pytest.raises(ConfigError):
        Stft(16, 32)


def test_mask_magnitude_and_waveform_representations_rebuild_audio() -> None:
    wave = _wave()
    mask_set = SpeechDataset([wave], [wave])
    magnitude = mask_set.inputs(0)["noisy_magnitude"]
    assert magnitude.dtype == np.float32 and magnitude.shape == (33, 257)
    ones = np.ones_like(magnitude)
    np.testing.assert_allclose(mask_set.postprocess({"mask": ones}, 0), wave, atol=1e-6)
    np.testing.assert_allclose(
        mask_set.postprocess({"mask": 0.5 * ones[:30]}, 0)[:3000], 0.5 * wave[:3000], atol=1e-6
    )
    spectral = SpeechDataset([wave], representation="magnitude")
    np.testing.assert_allclose(spectral.postprocess({"m": magnitude}, 0), wave, atol=1e-5)
    raw = SpeechDataset([wave], representation="waveform", input_name="audio")
    assert raw.inputs(0)["audio"].shape == (4000,)
    assert raw.postprocess({"y": wave[:3000]}, 0).shape == (4000,)
    with pytest.raises(DataError, match="frames, 257"):
        mask_set.postprocess({"mask": np.ones((33, 100))}, 0)
    with pytest.raises(ConfigError, match="representation"):
        SpeechDataset([wave], representation="cepstrum")


def test_wav_folder_round_trip_keeps_the_recipe(tmp_path: Path) -> None:
    clean = [_wave(3000, seed) for seed in range(3)]
    noisy = [c + _wave(3000, 9) for c in clean]
    dataset = SpeechDataset(noisy, clean, n_fft=256, hop=64, input_name="spec", output="mask")
    folder = dataset.save(tmp_path / "speech")
    loaded = load_dataset(folder)
    assert isinstance(loaded, SpeechDataset) and len(loaded) == 3
    assert loaded.describe() == dataset.describe()
    np.testing.assert_allclose(loaded.reference(2), clean[2], atol=1e-7)
    np.testing.assert_allclose(loaded.inputs(1)["spec"], dataset.inputs(1)["spec"], atol=1e-5)


def test_read_wav_scales_pcm_mixes_channels_and_resamples(tmp_path: Path) -> None:
    stereo = np.stack([np.full(800, 16384), np.full(800, -16384)], axis=1).astype(np.int16)
    wavfile.write(tmp_path / "a.wav", 8000, stereo)
    samples, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and np.allclose(samples, 0.0)
    wavfile.write(tmp_path / "b.wav", 8000, np.full(800, 64, dtype=np.uint8))
    samples, _ = read_wav(tmp_path / "b.wav")
    assert np.allclose(samples, -0.5)
    upsampled, rate = read_wav(tmp_path / "b.wav", 16000)
    assert rate == 16000 and len(upsampled) == 1600
    (tmp_path / "c.wav").write_bytes(b"RIFF....")
    with pytest.raises(DataError, match="not a readable WAV"):
        read_wav(tmp_path / "c.wav")


def test_wav_folder_without_references_and_with_missing_ones(tmp_path: Path) -> None:
    wavfile.write(tmp_path / "one.wav", 16000, _wave(1000).astype(np.float32))
    flat = load_dataset(tmp_path)
    assert len(flat) == 1 and flat.reference(0) is None
    paired = tmp_path / "paired"
    (paired / "noisy").mkdir(parents=True)
    (paired / "clean").mkdir()
    wavfile.write(paired / "noisy" / "x.wav", 16000, _wave(1000).astype(np.float32))
    with pytest.raises(DataError, match="lacks the references x.wav"):
        load_dataset(paired)
