"""Audio evaluation: STFT front-end, speech datasets, WAV folders, STOI and PESQ.

A speech-enhancement model maps noisy audio to enhanced audio. Many such models work on
spectra, so a :class:`SpeechDataset` describes, as plain data, how to build the model input from
a noisy waveform and how to rebuild a waveform from the model output:

========================  ==============================  ========================================
``representation``        model input (per item)          model output → waveform
========================  ==============================  ========================================
``"mask"``                \\|STFT(noisy)\\|, (frames, bins)  iSTFT(mask · STFT(noisy))
``"magnitude"``           \\|STFT(noisy)\\|, (frames, bins)  iSTFT(magnitude · e^{i∠STFT(noisy)})
``"waveform"``            noisy samples, (samples,)       the output samples
========================  ==============================  ========================================

The reconstructed waveform is cut or padded to the noisy length, and the metrics compare it
with the clean reference. The description is saved as ``dataset.json`` beside the ``clean/`` and
``noisy/`` WAV folders, so a folder on disk is a complete evaluation set.

STOI (``pystoi``) and PESQ (``pesq``) are optional: asking for them without the packages raises
:class:`~onnxzip.errors.RuntimeUnavailableError` naming the ``audio`` extra.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

from onnxzip.errors import ConfigError, DataError, RuntimeUnavailableError
from onnxzip.evaluators.base import Dataset, Metric, fit_length

log = logging.getLogger(__name__)

REPRESENTATIONS = ("mask", "magnitude", "waveform")
DESCRIPTION_FILE = "dataset.json"
PESQ_RATES = {"wb": 16000, "nb": 8000}


@dataclass(frozen=True)
class Stft:
    """Short-time Fourier transform with a periodic Hann window w and hop H, frames centred.

    Forward: X[t, k] = Σ_n w[n] · x[n + t·H − N/2] · e^{−2πikn/N}, x zero outside the signal.
    Inverse: weighted overlap-add, x̂[m] = Σ_t w[m − t·H] · IDFT(X[t])[m − t·H] / Σ_t w²[m − t·H],
    which restores x exactly when X is an unmodified STFT.
    """

    n_fft: int = 512
    hop: int = 128

    def __post_init__(self) -> None:
        if self.n_fft < 2 or self.hop < 1 or self.hop > self.n_fft:
            raise ConfigError(f"STFT needs n_fft >= 2 and 1 <= hop <= n_fft, got {self}.")

    @property
    def bins(self) -> int:
        """Frequency bins per frame, N/2 + 1."""
        return self.n_fft // 2 + 1

    @cached_property
    def window(self) -> np.ndarray:
        """Periodic Hann window, w[n] = 0.5 − 0.5·cos(2πn/N)."""
        return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(self.n_fft) / self.n_fft)

    def frames(self, length: int) -> int:
        """Number of frames for a signal of ``length`` samples."""
        return 1 + math.ceil(max(length, 1) / self.hop)

    def forward(self, wave: np.ndarray) -> np.ndarray:
        """Complex spectrum, shape (frames, bins)."""
        wave = np.asarray(wave, dtype=np.float64).reshape(-1)
        frames = self.frames(len(wave))
        total = (frames - 1) * self.hop + self.n_fft
        half = self.n_fft // 2
        padded = np.zeros(total)
        padded[half : half + len(wave)] = wave
        windows = np.lib.stride_tricks.sliding_window_view(padded, self.n_fft)[:: self.hop]
        return np.fft.rfft(windows * self.window, axis=-1)

    def inverse(self, spectrum: np.ndarray, length: int) -> np.ndarray:
        """Waveform of ``length`` samples from a (frames, bins) spectrum."""
        spectrum = np.asarray(spectrum)
        if spectrum.ndim != 2 or spectrum.shape[1] != self.bins:
            raise DataError(
                f"iSTFT needs a (frames, {self.bins}) spectrum, got shape {spectrum.shape}."
            )
        frames = spectrum.shape[0]
        total = (frames - 1) * self.hop + self.n_fft
        signal = np.zeros(total)
        weight = np.zeros(total)
        pieces = np.fft.irfft(spectrum, n=self.n_fft, axis=-1) * self.window
        for index in range(frames):
            start = index * self.hop
            signal[start : start + self.n_fft] += pieces[index]
            weight[start : start + self.n_fft] += self.window**2
        signal /= np.maximum(weight, 1e-8)
        half = self.n_fft // 2
        return fit_length(signal[half:], length)


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy.signal.resample_poly) by the reduced ratio to/from."""
    if from_rate == to_rate:
        return np.asarray(wave, dtype=np.float64)
    divisor = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(
        np.asarray(wave, dtype=np.float64), to_rate // divisor, from_rate // divisor
    )


def align(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both flattened to 1-D float64 and cut to the shorter length."""
    out = np.asarray(prediction, dtype=np.float64).reshape(-1)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    length = min(len(out), len(ref))
    if len(out) != len(ref):
        log.debug("aligning audio of %d and %d samples to %d", len(out), len(ref), length)
    return out[:length], ref[:length]


def _require(module: str, metric: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"{metric} needs the optional package {module}; install it with "
            "`pip install onnxzip[audio]`."
        ) from exc


def _sample_rate(dataset: Dataset, override: int | None, metric: str) -> int:
    rate = override or dataset.sample_rate
    if not rate:
        raise DataError(
            f"{metric} needs the audio sample rate; give it as {metric}:...,sample_rate=16000, "
            "a 'sample_rate' key in the .npz, or use a SpeechDataset."
        )
    return int(rate)


def stoi(extended: bool = False, sample_rate: int | None = None) -> Metric:
    """Mean STOI (or extended STOI) of enhanced vs clean speech, pystoi.stoi per utterance.

    pystoi resamples to its internal 10 kHz itself; lengths are aligned first.
    """
    name = "estoi" if extended else "stoi"
    pystoi = _require("pystoi", name.upper())

    def score(predictions: Sequence[np.ndarray], targets: Sequence[Any], dataset: Dataset) -> float:
        rate = _sample_rate(dataset, sample_rate, name)
        values = []
        for prediction, target in zip(predictions, targets):
            out, ref = align(prediction, target)
            values.append(pystoi.stoi(ref, out, rate, extended=extended))
        return float(np.mean(values))

    return Metric(name, score, higher_is_better=True)


def pesq(mode: str = "wb", sample_rate: int | None = None) -> Metric:
    """Mean PESQ (ITU-T P.862; wide band at 16 kHz, narrow band at 8 kHz) per utterance.

    Audio at another rate is resampled with resample_poly. Scores range from about −0.5 to
    4.64 (wb) / 4.55 (nb); higher is better.
    """
    if mode not in PESQ_RATES:
        raise ConfigError(f"pesq mode must be 'wb' or 'nb', got {mode!r}.")
    name = "pesq" if mode == "wb" else "pesq_nb"
    library = _require("pesq", "PESQ")
    target_rate = PESQ_RATES[mode]

    def score(predictions: Sequence[np.ndarray], targets: Sequence[Any], dataset: Dataset) -> float:
        rate = _sample_rate(dataset, sample_rate, name)
        values = []
        for index, (prediction, target) in enumerate(zip(predictions, targets)):
            out, ref = (resample(x, rate, target_rate) for x in align(prediction, target))
            try:
                values.append(library.pesq(target_rate, ref, out, mode))
            except library.PesqError as exc:
                raise DataError(f"PESQ cannot score item {index}: {exc}") from exc
        return float(np.mean(values))

    return Metric(name, score, higher_is_better=True)


def read_wav(
    path: str | os.PathLike[str], sample_rate: int | None = None
) -> tuple[np.ndarray, int]:
    """Mono float64 samples in [−1, 1] and the rate; resampled when ``sample_rate`` is given.

    Integer PCM is scaled by its full range; several channels are averaged.
    """
    try:
        rate, data = wavfile.read(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable WAV file ({exc}).") from exc
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        # Signed PCM is centred on 0, unsigned (8-bit) on half its range.
        middle = 0 if info.min < 0 else (info.max + 1) // 2
        data = (data.astype(np.float64) - middle) / (info.max + 1 - middle)
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if sample_rate and rate != sample_rate:
        return resample(data, rate, sample_rate), sample_rate
    return data, rate


class SpeechDataset(Dataset):
    """Noisy utterances (model inputs), optional clean ones (references), and the recipe that
    turns a waveform into the model input and the model output back into a waveform."""

    def __init__(
        self,
        noisy: Sequence[np.ndarray],
        clean: Sequence[np.ndarray] | None = None,
        *,
        sample_rate: int = 16000,
        n_fft: int = 512,
        hop: int = 128,
        representation: str = "mask",
        input_name: str = "noisy_magnitude",
        output: str | None = None,
    ) -> None:
        if representation not in REPRESENTATIONS:
            raise ConfigError(
                f"Unknown speech representation {representation!r}; choose one of "
                f"{', '.join(REPRESENTATIONS)}."
            )
        if clean is not None and len(clean) != len(noisy):
            raise DataError(f"{len(noisy)} noisy utterances but {len(clean)} clean ones.")
        self.noisy = [np.asarray(wave, dtype=np.float64).reshape(-1) for wave in noisy]
        self.clean = None if clean is None else [np.asarray(w, dtype=np.float64) for w in clean]
        self.sample_rate = int(sample_rate)
        self.stft = Stft(n_fft, hop)
        self.representation = representation
        self.input_name = input_name
        self.output = output

    def __len__(self) -> int:
        return len(self.noisy)

    def inputs(self, index: int) -> dict[str, np.ndarray]:
        wave = self.noisy[index]
        if self.representation == "waveform":
            return {self.input_name: wave.astype(np.float32)}
        return {self.input_name: np.abs(self.stft.forward(wave)).astype(np.float32)}

    def reference(self, index: int) -> np.ndarray | None:
        return None if self.clean is None else self.clean[index]

    def postprocess(self, outputs: Mapping[str, np.ndarray], index: int) -> np.ndarray:
        """The enhanced waveform of item ``index`` (see the table in the module docstring)."""
        output = np.asarray(super().postprocess(outputs, index), dtype=np.float64)
        wave = self.noisy[index]
        if self.representation == "waveform":
            return fit_length(output.reshape(-1), len(wave))
        spectrum = self.stft.forward(wave)
        output = output.reshape(-1, output.shape[-1]) if output.ndim >= 2 else output
        if output.ndim != 2 or output.shape[1] != spectrum.shape[1]:
            raise DataError(
                f"A {self.representation} model must output (frames, {spectrum.shape[1]}) per "
                f"utterance, got {output.shape}."
            )
        output = fit_length(output, spectrum.shape[0])
        if self.representation == "mask":
            enhanced = output * spectrum
        else:
            enhanced = output * np.exp(1j * np.angle(spectrum))
        return self.stft.inverse(enhanced, len(wave))

    def describe(self) -> dict[str, Any]:
        """The recipe as plain data (what ``dataset.json`` holds)."""
        return {
            "kind": "speech",
            "sample_rate": self.sample_rate,
            "n_fft": self.stft.n_fft,
            "hop": self.stft.hop,
            "representation": self.representation,
            "input_name": self.input_name,
            "output": self.output,
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``noisy/`` and ``clean/`` float32 WAVs and ``dataset.json``, atomically.

        The folder is built beside the target and renamed into place; an existing folder is
        replaced.
        """
        target = Path(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            parts = {"noisy": self.noisy} | ({} if self.clean is None else {"clean": self.clean})
            for part, waves in parts.items():
                (staging / part).mkdir()
                for index, wave in enumerate(waves):
                    wavfile.write(
                        staging / part / f"{index:04d}.wav",
                        self.sample_rate,
                        wave.astype(np.float32),
                    )
            (staging / DESCRIPTION_FILE).write_text(json.dumps(self.describe(), indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target


def load_wav_folder(folder: str | os.PathLike[str], **options: Any) -> SpeechDataset:
    """A :class:`SpeechDataset` from a folder of WAV files.

    Layout: ``noisy/*.wav`` with same-named ``clean/*.wav`` references, or WAV files directly in
    the folder (no references). ``dataset.json`` (see :meth:`SpeechDataset.describe`) sets the
    recipe; keyword ``options`` override it. Files at another rate are resampled.
    """
    root = Path(folder)
    description_path = root / DESCRIPTION_FILE
    settings: dict[str, Any] = {}
    if description_path.exists():
        try:
            settings = json.loads(description_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{description_path} is not valid JSON ({exc}).") from exc
        if settings.pop("kind", "speech") != "speech":
            raise DataError(f"{description_path} does not describe a speech dataset.")
    settings.update(options)
    noisy_dir = root / "noisy" if (root / "noisy").is_dir() else root
    noisy_files = sorted(noisy_dir.glob("*.wav"))
    if not noisy_files:
        raise DataError(f"{noisy_dir} holds no .wav files.")
    rate = int(settings.get("sample_rate", 16000))
    clean = None
    if noisy_dir != root and (root / "clean").is_dir():
        missing = [p.name for p in noisy_files if not (root / "clean" / p.name).exists()]
        if missing:
            raise DataError(f"{root / 'clean'} lacks the references {', '.join(missing[:3])}.")
        clean = [read_wav(root / "clean" / p.name, rate)[0] for p in noisy_files]
    noisy = [read_wav(p, rate)[0] for p in noisy_files]
    log.info("loaded %d utterances from %s", len(noisy), root)
    return SpeechDataset(noisy, clean, **{**settings, "sample_rate": rate})
