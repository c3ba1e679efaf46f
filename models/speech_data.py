"""Speech and noise for the speech-enhancement reference model, all seeded.

Clean speech comes from espeak-ng (several voices, speeds and pitches speaking sentences built
from fixed word lists). When espeak-ng is not installed a synthetic fallback is used and logged:
voiced "syllables" made of harmonics of a gliding f0, shaped by formant-like resonances, with
short noise bursts for consonants and pauses between words.

Noises: white, pink (power ∝ 1/f), brown (power ∝ 1/f²) and babble (a sum of other
utterances), mixed at an SNR drawn from :data:`SNRS_DB`:
noisy = clean + g·noise with g chosen so that 10·log10(Σclean² / Σ(g·noise)²) = SNR.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxzip.evaluators.audio import resample

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CLEAN_RMS = 0.05
SNRS_DB = (-5.0, 0.0, 5.0, 10.0)
NOISE_KINDS = ("white", "pink", "brown", "babble")
BABBLE_TALKERS = 4
VOICES = (
    "en-us",
    "en-us+f3",
    "en-gb-x-rp+m3",
    "en-029+f2",
    "en-gb-scotland",
    "en+klatt2",
    "en-us+m7",
    "en-gb+f4",
)
SPEEDS = (130, 150, 170, 190)
PITCHES = (30, 45, 60, 75)

_SUBJECTS = (
    "The young doctor",
    "My older sister",
    "A tired driver",
    "The small boy",
    "Our new neighbour",
    "The old fisherman",
    "A clever student",
    "The busy waiter",
    "Her best friend",
    "The patient teacher",
    "A brave soldier",
    "The quiet farmer",
)
_VERBS = (
    "painted",
    "carried",
    "found",
    "opened",
    "repaired",
    "sold",
    "counted",
    "cleaned",
    "described",
    "borrowed",
)
_OBJECTS = (
    "a bright red kite",
    "seven wooden boxes",
    "the broken window",
    "a bag of green apples",
    "the heavy iron gate",
    "two silver coins",
    "an old leather map",
    "the yellow bicycle",
    "a basket of fresh bread",
    "the tall glass vase",
)
_ENDINGS = (
    "before the storm arrived",
    "near the river bank",
    "early on Monday morning",
    "in the crowded market",
    "after a long day at work",
    "while the children were sleeping",
    "behind the little church",
    "under the bright summer sun",
)


@dataclass(frozen=True)
class Corpus:
    """Clean utterances at :data:`SAMPLE_RATE`, scaled to RMS :data:`CLEAN_RMS`."""

    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    source: str  # "espeak-ng" or "synthetic"


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences "subject verb object ending." drawn without repetition."""
    rng = np.random.default_rng(seed)
    sizes = (len(_SUBJECTS), len(_VERBS), len(_OBJECTS), len(_ENDINGS))
    picks = rng.choice(int(np.prod(sizes)), size=count, replace=False)
    words = (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)
    return [
        " ".join(part[i] for part, i in zip(words, np.unravel_index(pick, sizes))) + "."
        for pick in picks
    ]


def espeak_available() -> bool:
    """True when the espeak-ng program is on PATH."""
    return shutil.which("espeak-ng") is not None


def _normalized(wave_: np.ndarray) -> np.ndarray:
    """Leading/trailing silence (below 1 % of the peak) cut, then scaled to :data:`CLEAN_RMS`."""
    loud = np.flatnonzero(np.abs(wave_) > 0.01 * np.max(np.abs(wave_)))
    trimmed = wave_[loud[0] : loud[-1] + 1]
    return trimmed * (CLEAN_RMS / np.sqrt(np.mean(trimmed**2)))


def synthesize(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance spoken by espeak-ng, resampled to :data:`SAMPLE_RATE` and normalized."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "utterance.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
            check=True,
            capture_output=True,
        )
        with wave.open(str(path)) as reader:
            rate = reader.getframerate()
            samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    return _normalized(resample(samples / 32768.0, rate, SAMPLE_RATE))


_VOWEL_FORMANTS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (530, 1840, 2480),
    (570, 840, 2410),
    (300, 870, 2240),
    (660, 1720, 2410),
    (490, 1350, 1690),
)


def synthetic_utterance(rng: np.random.Generator) -> np.ndarray:
    """A speech-like signal: 2–4 "words" of 1–3 syllables each, separated by pauses.

    A syllable is Σ_h A(h·f0)·sin(2π·h·∫f0) for harmonics below 7 kHz, with the amplitude
    A(f) = Σ_formants exp(−(f − F)² / (2·(F/8)²)) of a randomly chosen vowel, under a Hann
    envelope, preceded half the time by a short high-passed noise burst (a fricative).
    """
    pieces = []
    base_f0 = rng.uniform(90, 230)
    for _ in range(rng.integers(2, 5)):
        for _ in range(rng.integers(1, 4)):
            length = int(rng.uniform(0.12, 0.3) * SAMPLE_RATE)
            if rng.random() < 0.5:
                burst = rng.normal(size=int(0.05 * SAMPLE_RATE))
                pieces.append(np.diff(burst, prepend=0.0) * np.hanning(len(burst)) * 0.3)
            f0 = base_f0 * np.linspace(1.0, rng.uniform(0.8, 1.2), length)
            phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
            formants = _VOWEL_FORMANTS[rng.integers(len(_VOWEL_FORMANTS))]
            harmonics = np.arange(1, int(7000 / base_f0))
            frequencies = harmonics[:, None] * base_f0
            gains = np.exp(
                -((frequencies - np.asarray(formants)) ** 2) / (2 * (np.asarray(formants) / 8) ** 2)
            )
            syllable = gains.sum(axis=1) @ np.sin(np.outer(harmonics, phase))
            pieces.append(syllable * np.hanning(length))
        pieces.append(np.zeros(int(rng.uniform(0.05, 0.2) * SAMPLE_RATE)))
    return _normalized(np.concatenate(pieces))


@functools.lru_cache(maxsize=4)
def speech_corpus(
    count: int = 80, held_out: int = 12, seed: int = 0, use_espeak: bool | None = None
) -> Corpus:
    """``count`` clean utterances, the last ``held_out`` of them (unseen sentences) for testing.

    Voice, speed and pitch are drawn per utterance. ``use_espeak=None`` uses espeak-ng when it
    is installed and the synthetic fallback otherwise.
    """
    rng = np.random.default_rng(seed)
    installed = espeak_available()
    if use_espeak is None:
        use_espeak = installed
    if use_espeak:
        utterances = [
            synthesize(
                text, str(rng.choice(VOICES)), int(rng.choice(SPEEDS)), int(rng.choice(PITCHES))
            )
            for text in sentences(count, seed)
        ]
        source = "espeak-ng"
    else:
        reason = "espeak-ng is not installed" if not installed else "synthetic speech was asked for"
        log.warning("%s; using synthetic speech-like signals instead of espeak-ng", reason)
        utterances = [synthetic_utterance(rng) for _ in range(count)]
        source = "synthetic"
    log.info("speech corpus: %d utterances from %s", count, source)
    return Corpus(tuple(utterances[:-held_out]), tuple(utterances[-held_out:]), source)


def _coloured(length: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power spectrum ∝ 1/f^exponent (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.normal(size=length))
    frequencies = np.arange(len(spectrum), dtype=np.float64)
    frequencies[0] = 1.0
    return np.fft.irfft(spectrum / frequencies ** (exponent / 2), n=length)


def noise(
    kind: str, length: int, rng: np.random.Generator, talkers: tuple[np.ndarray, ...]
) -> np.ndarray:
    """Noise of ``kind`` (see :data:`NOISE_KINDS`), unit RMS; babble sums random ``talkers``."""
    if kind == "babble":
        signal = np.zeros(length)
        for index in rng.choice(len(talkers), size=BABBLE_TALKERS, replace=False):
            talker = np.resize(talkers[index], length + len(talkers[index]))
            start = rng.integers(len(talkers[index]))
            signal += talker[start : start + length]
    else:
        signal = _coloured(length, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind], rng)
    return signal / np.sqrt(np.mean(signal**2))


def mix(clean: np.ndarray, noise_: np.ndarray, snr_db: float) -> np.ndarray:
    """clean + g·noise with 10·log10(Σclean² / Σ(g·noise)²) = ``snr_db``."""
    gain = np.sqrt(np.sum(clean**2) / (np.sum(noise_**2) * 10 ** (snr_db / 10)))
    return clean + gain * noise_


def noisy_version(
    clean: np.ndarray,
    rng: np.random.Generator,
    talkers: tuple[np.ndarray, ...],
    kind: str | None = None,
    snr_db: float | None = None,
) -> np.ndarray:
    """``clean`` mixed with noise of ``kind`` at ``snr_db`` (each drawn at random when None)."""
    kind = kind or str(rng.choice(NOISE_KINDS))
    snr_db = float(rng.choice(SNRS_DB)) if snr_db is None else snr_db
    return mix(clean, noise(kind, len(clean), rng, talkers), snr_db)


def held_out_mixtures(corpus: Corpus, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(noisy, clean) for the test utterances, cycling through every noise kind and SNR.

    Babble is made of *test* utterances other than the one it covers, so nothing from
    training leaks in.
    """
    rng = np.random.default_rng(seed + 1)
    noisy = []
    for index, clean in enumerate(corpus.test):
        others = corpus.test[:index] + corpus.test[index + 1 :]
        kind = NOISE_KINDS[index % len(NOISE_KINDS)]
        snr_db = SNRS_DB[(index // len(NOISE_KINDS) + index) % len(SNRS_DB)]
        noisy.append(noisy_version(clean, rng, others, kind, snr_db))
    return noisy, list(corpus.test)
