"""Datasets for the examples: offline Fashion-MNIST, and CIFAR / ImageNet via tfds.

Fashion-MNIST (MIT licence) is read from the Debian package
`dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/`) when it is
installed, else from the 4,000 + 1,000 image subset shipped in
`keras_blpa/data/`. CIFAR-10/100 and ImageNet use `tensorflow_datasets`, which
downloads CIFAR on first use; ImageNet needs `manual_dir` with the archives.
`cifar_arrays` and `CifarBatches` are the TensorFlow-free CIFAR route (Keras's
own downloader, NumPy augmentation) for Keras's JAX backend, e.g. on a Colab
TPU, which ships JAX without TensorFlow.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

if TYPE_CHECKING:  # TensorFlow is imported where tfds is used, not on import
    import tensorflow as tf

FASHION_MNIST_DIR = Path(
    os.environ.get("KERAS_BLPA_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)
SUBSET = Path(__file__).parent / "data" / "fashion_mnist_subset.npz"
PYTHON_DOCS_DIR = Path(os.environ.get("KERAS_BLPA_PYTHON_DOCS_DIR",
                                      "/usr/share/doc/python3.11/html/_sources"))
TEXT_SUBSET = Path(__file__).parent / "data" / "python_docs_subset.txt.gz"
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], "float32")
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], "float32")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], "float32")
IMAGENET_STD = np.array([0.229, 0.224, 0.225], "float32")


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist(source: str = "auto") -> tuple[tuple, tuple, str]:
    """Fashion-MNIST as float32 NHWC in [0, 1] with int labels.

    Args:
      source: "debian" (the full 60k + 10k set from the Debian package),
        "subset" (the shipped 4k + 1k subset) or "auto" (debian if present).

    Returns:
      `((x_train, y_train), (x_test, y_test), description)`.
    """
    if source not in ("auto", "debian", "subset"):
        raise ValueError(f"`source` must be auto, debian or subset; received {source!r}.")
    files = [FASHION_MNIST_DIR / f"{p}-{k}-idx{d}-ubyte.gz"
             for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    if source == "debian" or (source == "auto" and all(f.exists() for f in files)):
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files not found: {missing}. Install them with "
                "`apt-get install dataset-fashion-mnist` or use source='subset'."
            )
        x_train, y_train, x_test, y_test = (
            _idx(files[0], 16).reshape(-1, 28, 28), _idx(files[1], 8),
            _idx(files[2], 16).reshape(-1, 28, 28), _idx(files[3], 8),
        )
        description = f"Fashion-MNIST from {FASHION_MNIST_DIR}"
    else:
        with np.load(SUBSET) as data:
            x_train, y_train = data["x_train"], data["y_train"]
            x_test, y_test = data["x_test"], data["y_test"]
        description = "Fashion-MNIST subset shipped with keras_blpa"

    def prep(x):
        return (x.astype("float32") / 255.0)[..., None]

    return (
        (prep(x_train), y_train.astype("int32")),
        (prep(x_test), y_test.astype("int32")),
        description,
    )


def load_python_docs(source: str = "auto", test_fraction: float = 0.05
                     ) -> tuple[np.ndarray, np.ndarray, str]:
    """English text as bytes (uint8): the Python documentation's reST sources.

    Args:
      source: "debian" (every `*.rst.txt` of the Debian package `python3-doc`,
        about 12 MB), "subset" (its tutorial, 256 KB, shipped with keras_blpa)
        or "auto" (debian if present).
      test_fraction: the share of the text (its end) held out for testing.

    Returns:
      `(train_bytes, test_bytes, description)`.
    """
    if source not in ("auto", "debian", "subset"):
        raise ValueError(f"`source` must be auto, debian or subset; received {source!r}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be in (0, 1); received {test_fraction!r}.")
    files = sorted(PYTHON_DOCS_DIR.rglob("*.rst.txt")) if PYTHON_DOCS_DIR.is_dir() else []
    if source == "debian" and not files:
        raise FileNotFoundError(
            f"no *.rst.txt under {PYTHON_DOCS_DIR}. Install them with `apt-get install "
            "python3-doc`, set KERAS_BLPA_PYTHON_DOCS_DIR, or use source='subset'.")
    if files and source != "subset":
        text = b"".join(f.read_bytes() for f in files)
        description = f"Python documentation sources from {PYTHON_DOCS_DIR} ({len(files)} files)"
    else:
        with gzip.open(TEXT_SUBSET) as f:
            text = f.read()
        description = "Python tutorial sources shipped with keras_blpa"
    data = np.frombuffer(text, np.uint8)
    split = int(len(data) * (1 - test_fraction))
    return data[:split], data[split:], description


def _augment_cifar(image, label):
    """Standard CIFAR augmentation: 4-pixel pad, random 32x32 crop, flip."""
    import tensorflow as tf

    image = tf.image.resize_with_crop_or_pad(image, 40, 40)
    image = tf.image.random_crop(image, [32, 32, 3])
    image = tf.image.random_flip_left_right(image)
    return image, label


def cifar(
    name: str = "cifar10", batch_size: int = 128, data_dir: str | None = None
) -> tuple[tf.data.Dataset, tf.data.Dataset, int]:
    """CIFAR-10/100 train (augmented, shuffled) and test pipelines from tfds
    (tf.data pipelines, which every Keras backend's `fit` reads)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"`name` must be cifar10 or cifar100; received {name!r}.")
    (train, test), info = tfds.load(
        name, split=["train", "test"], as_supervised=True, with_info=True, data_dir=data_dir
    )

    def normalize(image, label):
        image = tf.cast(image, tf.float32) / 255.0
        return (image - CIFAR_MEAN) / CIFAR_STD, label

    auto = tf.data.AUTOTUNE
    train = (train.map(normalize, auto).cache().shuffle(50_000)
             .map(_augment_cifar, auto).batch(batch_size, drop_remainder=True).prefetch(auto))
    test = test.map(normalize, auto).batch(batch_size).prefetch(auto)
    return train, test, info.features["label"].num_classes


def cifar_arrays(name: str = "cifar10") -> tuple[tuple, tuple, int]:
    """CIFAR-10/100 as normalized float32 NHWC arrays and int32 labels, from
    `keras.datasets` (downloads on first use; no TensorFlow needed).

    Returns:
      `((x_train, y_train), (x_test, y_test), classes)`.
    """
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"`name` must be cifar10 or cifar100; received {name!r}.")
    loader = keras.datasets.cifar10 if name == "cifar10" else keras.datasets.cifar100
    (x_train, y_train), (x_test, y_test) = loader.load_data()

    def prep(x):
        return ((x.astype("float32") / 255.0 - CIFAR_MEAN) / CIFAR_STD).astype("float32")

    return ((prep(x_train), y_train.reshape(-1).astype("int32")),
            (prep(x_test), y_test.reshape(-1).astype("int32")),
            10 if name == "cifar10" else 100)


class CifarBatches(keras.utils.PyDataset):
    """Batches of CIFAR arrays for `model.fit` on any Keras backend: with
    `augment`, the standard 4-pixel pad, random 32x32 crop and horizontal
    flip and a new order every epoch (as the tf.data pipeline of `cifar`),
    all drawn from `(seed, epoch, batch)`; without, every sample in order.
    """

    def __init__(self, x, y, batch_size: int, augment: bool = False, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.augment, self.seed, self.epoch = augment, seed, 0
        self._shuffle()

    def _shuffle(self) -> None:
        self.order = (np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))
                      if self.augment else np.arange(len(self.x)))

    def __len__(self) -> int:
        if self.augment:  # whole batches only, as drop_remainder=True
            return max(len(self.x) // self.batch_size, 1)
        return -(-len(self.x) // self.batch_size)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._shuffle()

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images, labels = self.x[rows], self.y[rows]
        if not self.augment:
            return images, labels
        rng = np.random.default_rng([self.seed, self.epoch, index])
        padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
        top, left = rng.integers(0, 9, size=(2, len(rows)))
        crops = np.stack([padded[i, t:t + 32, s:s + 32]
                          for i, (t, s) in enumerate(zip(top, left))])
        flip = rng.random(len(rows)) < 0.5
        crops[flip] = crops[flip, :, ::-1]
        return crops, labels


def imagenet(
    manual_dir: str, batch_size: int = 64, image_size: int = 224, data_dir: str | None = None
) -> tuple[tf.data.Dataset, tf.data.Dataset, int]:
    """ImageNet (ILSVRC 2012) from tfds with the archives in `manual_dir`.

    Training: random resized crop and flip; validation: resize to 256/224 of
    `image_size` and centre crop.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    (train, val), info = tfds.load(
        "imagenet2012", split=["train", "validation"], as_supervised=True, with_info=True,
        data_dir=data_dir, download_and_prepare_kwargs={"download_config": config},
    )

    def normalize(image):
        return (tf.cast(image, tf.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD

    def train_map(image, label):
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([0, 0, 4]), area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3), use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(image, [image_size, image_size])
        return normalize(tf.image.random_flip_left_right(image)), label

    def val_map(image, label):
        resize = int(image_size * 256 / 224)
        image = tf.image.resize(image, [resize, resize])
        image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
        return normalize(image), label

    auto = tf.data.AUTOTUNE
    train = (train.shuffle(10_000).map(train_map, auto)
             .batch(batch_size, drop_remainder=True).prefetch(auto))
    val = val.map(val_map, auto).batch(batch_size).prefetch(auto)
    return train, val, info.features["label"].num_classes
