"""Digit tasks built from scikit-learn's bundled 8x8 digits (no download).

The base task is plain digit classification. Each derived task changes the input
(rotation, mirror, negative, noise, shift...) and usually the labels too, so that the
base features alone (a new head on the frozen backbone) do clearly worse than
an adapter: merging then has real task knowledge to keep or lose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 0
NOISE_SEED = 1234
PERMUTATION_SEED = 7


@dataclass(frozen=True)
class Task:
    """A derived task: ``transform(images [N, 8, 8]) -> [N, 8, 8]``, ``label(digits [N]) -> [N]``.

    ``classes`` restricts the task to those digits (None: all ten); ``n_classes`` is
    the head's output size.
    """

    name: str
    transform: Callable[[np.ndarray], np.ndarray]
    label: Callable[[np.ndarray], np.ndarray]
    n_classes: int
    classes: tuple[int, ...] | None = None
    doc: str = ""


def _identity(y: np.ndarray) -> np.ndarray:
    return y


def _noisy(images: np.ndarray) -> np.ndarray:
    # Seeded noise drawn over the whole set in data-set order (``Digits.split`` always
    # transforms all images before indexing), so each image gets the same noise in
    # every split and every run.
    noise = np.random.default_rng(NOISE_SEED).normal(0.0, 4.0, size=images.shape)
    return np.clip(images + noise, 0.0, 16.0)


_PERMUTATION = np.random.default_rng(PERMUTATION_SEED).permutation(10)

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("rot90", lambda x: np.rot90(x, 1, axes=(1, 2)), _identity, 10, doc="rotated 90 degrees, digit"),
        Task("flip_lr", lambda x: x[:, :, ::-1], _identity, 10, doc="mirrored left-right, digit"),
        Task("invert_mod3", lambda x: 16.0 - x, lambda y: y % 3, 3, doc="negative image, digit mod 3"),
        Task("transpose_parity", lambda x: x.transpose(0, 2, 1), lambda y: y % 2, 2, doc="transposed, even/odd"),
        Task("rot180_subset", lambda x: np.rot90(x, 2, axes=(1, 2)), lambda y: y - 5, 5, classes=(5, 6, 7, 8, 9),
             doc="rotated 180 degrees, digits 5-9 only"),
        Task("shift_perm", lambda x: np.roll(x, 3, axis=1), lambda y: _PERMUTATION[y], 10,
             doc="rows rolled down by 3 (wrapping), labels permuted"),
        Task("flipud_subset", lambda x: x[:, ::-1, :], _identity, 5, classes=(0, 1, 2, 3, 4),
             doc="mirrored top-bottom, digits 0-4 only"),
        Task("noisy", _noisy, _identity, 10, doc="gaussian noise (std 4 on the 0-16 scale), digit"),
    ]
}


@dataclass
class Split:
    """Inputs ``x [N, 64]`` in [0, 1] and integer labels ``y [N]``."""

    x: torch.Tensor
    y: torch.Tensor


class Digits:
    """The digits data set with one fixed stratified train/val/test split (60/20/20).

    The base model and every adapter train on ``train``; merge hyper-parameters
    (lambda, top_k) are chosen on ``val``; reported accuracies are on ``test``.
    """

    def __init__(self, seed: int = SPLIT_SEED):
        data = load_digits()
        self.images = data.images.astype(np.float64)  # [1797, 8, 8], values 0..16
        self.digits = data.target.astype(np.int64)  # [1797]
        index = np.arange(len(self.digits))
        train, rest = train_test_split(index, test_size=0.4, stratify=self.digits, random_state=seed)
        val, test = train_test_split(rest, test_size=0.5, stratify=self.digits[rest], random_state=seed)
        self.index = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def split(self, task: Task | None, part: str) -> Split:
        """``part`` of the base task (``task=None``) or of a derived task."""
        if part not in self.index:
            raise ValueError(f"tasks.py: unknown split {part!r}; expected one of {sorted(self.index)}")
        # Transform the whole set first, then index: per-image transforms (the noise)
        # stay tied to the image, not to its position inside a split.
        images = self.images if task is None else task.transform(self.images)
        labels = self.digits if task is None else task.label(self.digits)
        idx = self.index[part]
        if task is not None and task.classes is not None:
            idx = idx[np.isin(self.digits[idx], task.classes)]
        x = torch.tensor(np.ascontiguousarray(images[idx]).reshape(len(idx), 64) / 16.0, dtype=torch.float32)
        return Split(x, torch.tensor(labels[idx], dtype=torch.int64))


def get_tasks(names: list[str] | None = None) -> list[Task]:
    """Tasks by name, in the given order (all of them by default)."""
    if names is None:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"tasks.py: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    return [TASKS[n] for n in names]
