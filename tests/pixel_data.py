"""A tiny synthetic image data set shaped like MNIST (28x28, values in [0, 1]) with 3 classes.

Class 0 is a vertical stroke, class 1 a horizontal stroke, class 2 a diagonal one; each image is
shifted by up to 2 pixels and carries a little noise, so that prototypes have something to learn
and their pictures something to show.
"""

from __future__ import annotations

import torch

from protobench.datasets.base import DatasetSplits, Split

SIDE = 28
N_CLASSES = 3


def pixel_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % N_CLASSES
    images = torch.zeros(n, SIDE, SIDE)
    centre = torch.arange(SIDE)
    for i in range(n):
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        if y[i] == 0:
            images[i, 4:24, 13 + dx:15 + dx] = 1.0
        elif y[i] == 1:
            images[i, 13 + dy:15 + dy, 4:24] = 1.0
        else:
            rows = centre[4:24]
            images[i, rows, (rows + dx).clamp(0, SIDE - 1)] = 1.0
    noise = 0.1 * torch.rand(n, SIDE, SIDE, generator=g)
    X = (images + noise).clamp(0.0, 1.0).reshape(n, SIDE * SIDE)
    return Split(X=X, y=y)


def pixel_splits(n_train: int = 240, seed: int = 0) -> DatasetSplits:
    return DatasetSplits(
        name="pix", n_classes=N_CLASSES, image_shape=(SIDE, SIDE),
        train=pixel_split(n_train, seed + 1), val=pixel_split(90, seed + 2),
        _test=pixel_split(90, seed + 3),
    )
