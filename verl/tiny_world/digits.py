"""Images of two handwritten digits side by side, from scikit-learn's offline `load_digits` (1797 8x8 scans).

The source scans are split into train/val/test first, so no test image is ever seen in training;
examples are then pairs of scans drawn from one split.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

DIGIT_SIDE = 28  # each scan is upscaled to 28x28, so a pair is 28 high and 56 wide
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


@dataclass(frozen=True)
class DigitScans:
    """All source scans as white-on-black 28x28 uint8 images, with their labels."""

    images: np.ndarray  # (n, 28, 28) uint8
    labels: np.ndarray  # (n,) int64


def load_digit_scans() -> DigitScans:
    """Loads the scans and upscales them; ink (value 16) becomes white (255)."""
    digits = load_digits()
    images = []
    for scan in digits.images:
        small = Image.fromarray(np.round(scan * (255 / 16)).astype(np.uint8))
        images.append(np.asarray(small.resize((DIGIT_SIDE, DIGIT_SIDE), Image.Resampling.BILINEAR)))
    return DigitScans(images=np.stack(images), labels=digits.target.astype(np.int64))


def split_sources(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Splits scan indices 70/15/15 within each digit class, so every split has every digit.

    Returns sorted, disjoint index arrays keyed by split name.
    """
    splits: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_FRACTIONS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_train = round(len(members) * SPLIT_FRACTIONS["train"])
        n_val = round(len(members) * SPLIT_FRACTIONS["val"])
        splits["train"].append(members[:n_train])
        splits["val"].append(members[n_train : n_train + n_val])
        splits["test"].append(members[n_train + n_val :])
    return {name: np.sort(np.concatenate(parts)) for name, parts in splits.items()}


def sample_pairs(sources: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Draws `count` (left, right) pairs of scan indices from `sources`, with replacement."""
    return rng.choice(sources, size=(count, 2), replace=True)


def pair_png(scans: DigitScans, left_id: int, right_id: int) -> bytes:
    """The two scans side by side as an RGB PNG of 28x56 pixels."""
    pixels = np.concatenate([scans.images[left_id], scans.images[right_id]], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()
