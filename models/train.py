"""Seeded, deterministic training of the reference models, and their command line.

``python -m onnxzip.models.train NAME... | all [--retrain]`` trains (or loads from the cache),
exports, and prints each model's held-out quality (test accuracy in torch and in onnxruntime for
the classifiers; STOI/PESQ or PSNR for the speech and denoising models) with the time taken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from onnxzip.models.data import Splits

log = logging.getLogger(__name__)

BN_L1_LR_SCALE = 10.0


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run; part of the cache key (its repr is hashed)."""

    epochs: int
    learning_rate: float
    weight_decay: float
    batch_size: int = 64
    max_shift: int = 0  # random translation of image batches by up to this many pixels
    seed: int = 0
    threads: int = 1
    bn_l1: float = 0.0  # network slimming: + bn_l1 · Σ|γ| over every BatchNorm (method 2, step 1)


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch and fix its thread count for the duration; restore both afterwards.

    CPU kernels are deterministic for a given thread count, but reductions split differently
    with another count, which changes the trained weights in the last bits. One thread is the
    default: on a small shared machine (2-core CI runners) OpenMP threads competing with other
    processes made a training step 5-20× slower than a single thread.
    """
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous_threads)


def _random_shift(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate the whole batch by up to ``max_shift`` pixels along height and width.

    ``roll`` wraps around, which is harmless here: the digits' borders are blank.
    """
    shifts = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)
    return torch.roll(batch, shifts=(int(shifts[0]), int(shifts[1])), dims=(-2, -1))


@torch.no_grad()
def predict(module: nn.Module, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Eval-mode outputs of ``module`` on ``inputs``, batched."""
    module.eval()
    outputs = [
        module(torch.tensor(inputs[start : start + batch_size])).numpy()
        for start in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outputs)


def accuracy(module: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``module`` in eval mode."""
    return float((predict(module, inputs).argmax(axis=1) == labels).mean())


def bn_l1_penalty(module: nn.Module) -> torch.Tensor:
    """``Σ|γ|`` over the scales of every BatchNorm of ``module`` (the sparsity term g(γ) = |γ|)."""
    scales = [m.weight.abs().sum() for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return torch.stack(scales).sum() if scales else torch.zeros(())


def _parameter_groups(module: nn.Module, config: TrainConfig) -> list[dict]:
    """One group, or with ``bn_l1`` the BN scales apart at ``BN_L1_LR_SCALE``× the learning rate
    and without weight decay: Adam moves a parameter by about one learning rate per step, too
    little for unneeded scales to reach zero in a short run."""
    if not config.bn_l1:
        return [{"params": list(module.parameters()), "lr": config.learning_rate}]
    scales = {id(m.weight) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return [
        {"params": [p for p in module.parameters() if id(p) not in scales], "lr": config.learning_rate},
        {"params": [p for p in module.parameters() if id(p) in scales],
         "lr": config.learning_rate * BN_L1_LR_SCALE, "weight_decay": 0.0},
    ]


def fit_classifier(
    module: nn.Module, data: Splits, config: TrainConfig, *, quiet: bool = False
) -> dict[str, float]:
    """Train with AdamW, cross-entropy and a one-cycle (warm-up then cosine) learning rate.

    With ``config.bn_l1 > 0`` the loss adds ``bn_l1 · Σ|γ|`` (sparsity training on BN scales,
    network slimming), so channel pruning by ``|γ|`` later removes channels that carry little.
    Returns the metrics stored with the cached model: train/test accuracy and training seconds.
    """
    started = time.perf_counter()
    with deterministic(config.seed, config.threads):
        generator = torch.Generator().manual_seed(config.seed)
        inputs = torch.tensor(data.train_inputs)
        labels = torch.tensor(data.train_labels)
        steps_per_epoch = math.ceil(len(inputs) / config.batch_size)
        optimizer = torch.optim.AdamW(
            _parameter_groups(module, config), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            epochs=config.epochs,
            steps_per_epoch=steps_per_epoch,
        )
        loss_function = nn.CrossEntropyLoss()
        progress = tqdm(
            range(config.epochs),
            desc=f"train {type(module).__name__}",
            disable=quiet or not sys.stderr.isatty(),
        )
        for _ in progress:
            module.train()
            order = torch.randperm(len(inputs), generator=generator)
            total_loss = 0.0
            for start in range(0, len(inputs), config.batch_size):
                batch = order[start : start + config.batch_size]
                batch_inputs = inputs[batch]
                if config.max_shift:
                    batch_inputs = _random_shift(batch_inputs, config.max_shift, generator)
                loss = loss_function(module(batch_inputs), labels[batch])
                if config.bn_l1:
                    loss = loss + config.bn_l1 * bn_l1_penalty(module)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += loss.item() * len(batch)
            progress.set_postfix(loss=f"{total_loss / len(inputs):.4f}")
        module.eval()
        metrics = {
            "train_accuracy": accuracy(module, data.train_inputs, data.train_labels),
            "test_accuracy": accuracy(module, data.test_inputs, data.test_labels),
            "train_seconds": round(time.perf_counter() - started, 2),
        }
    log.info("trained %s: %s", type(module).__name__, metrics)
    return metrics


def _other_models() -> dict[str, Callable[[], tuple[Any, Any]]]:
    """The reference models outside the classifier registry: name -> build function returning
    (ONNX path, held-out dataset); their metrics are cached beside the model."""
    from onnxzip.models.denoise import build_denoise_reference
    from onnxzip.models.speech import build_speech_reference

    return {"speech": build_speech_reference, "denoise": build_denoise_reference}


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or load from the cache) and report each requested reference model."""
    # Imported here: the registry imports this module for TrainConfig and fit_classifier.
    from onnxzip.models.cache import METRICS_FILE
    from onnxzip.models.zoo import REFERENCE_MODELS, get_reference_model

    others = ("speech", "denoise")
    parser = argparse.ArgumentParser(prog="python -m onnxzip.models.train", description=__doc__)
    parser.add_argument("names", nargs="+", choices=[*REFERENCE_MODELS, *others, "all"])
    parser.add_argument("--retrain", action="store_true", help="ignore the cache and train the classifiers again "
                        "(speech, denoise: delete their cache folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [*REFERENCE_MODELS, *others] if "all" in args.names else args.names
    for name in names:
        started = time.perf_counter()
        if name in others:
            path, _ = _other_models()[name]()
            measured = json.loads((path.parent / METRICS_FILE).read_text())
            print(f"{name}: {', '.join(f'{k} {v}' for k, v in measured.items())} "
                  f"(this run {time.perf_counter() - started:.1f} s) -> {path}")
            continue
        reference = get_reference_model(name, retrain=args.retrain, quiet=args.quiet)
        measured = ", ".join(f"{key} {value}" for key, value in reference.metrics.items())
        if reference.task == "classification":
            measured += f", onnxruntime test_accuracy {reference.accuracy(reference.onnx_path):.4f}"
        print(
            f"{name}: {measured} (this run {time.perf_counter() - started:.1f} s)"
            f" -> {reference.onnx_path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
