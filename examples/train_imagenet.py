"""Train a pre-activation ResNet-152 (or 50/101) on ImageNet with BLPA.

Data: tensorflow-datasets `imagenet2012`, which needs the ILSVRC 2012
archives (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) in `--manual-dir`.
Recipe: SGD momentum 0.9, weight decay 1e-4, learning rate 0.1 x batch/256
divided by 10 at 50% and 75% of training; random resized crops and flips.
Reports top-1 and top-5 validation accuracy.

    python examples/train_imagenet.py --manual-dir ~/imagenet --depth 152 --bits 4
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from keras_blpa import datasets, training  # noqa: E402
from keras_blpa.models import preact_resnet_imagenet  # noqa: E402

TRAIN_IMAGES = 1_281_167


# The network downsamples 32x (stem, max pool and three strided stages).
MIN_IMAGE_SIZE = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manual-dir", required=True, help="folder with the ILSVRC 2012 tars")
    p.add_argument("--data-dir", default=None, help="tfds data directory")
    p.add_argument("--depth", type=int, default=152, choices=[50, 101, 152])
    p.add_argument("--width", type=training.positive_float, default=1.0)
    p.add_argument("--bits", type=training.bits_or_none, default=4,
                   help="4, 8 or none (exact)")
    p.add_argument("--naive", action="store_true")
    p.add_argument("--window", type=training.positive_float, default=None,
                   help="quantizer range in standard deviations (default: 6 at 4 bits, "
                        "12 at 8 bits; 6 is the paper's)")
    p.add_argument("--stock", action="store_true")
    p.add_argument("--epochs", type=training.positive_int, default=90)
    p.add_argument("--steps-per-epoch", type=training.positive_int, default=None)
    p.add_argument("--batch-size", type=training.positive_int, default=64)
    p.add_argument("--image-size", type=training.positive_int, default=224)
    p.add_argument("--weight-decay", type=training.non_negative_float, default=1e-4)
    p.add_argument("--jit-compile", action="store_true", default=None,
                   help="XLA on TensorFlow too (pure-TF quantizer; JAX always compiles)")
    p.add_argument("--out", default="runs/imagenet")
    args = p.parse_args(argv)
    if args.image_size < MIN_IMAGE_SIZE:
        p.error(f"argument --image-size: must be at least {MIN_IMAGE_SIZE} (the network "
                f"downsamples {MIN_IMAGE_SIZE}x); received {args.image_size}")
    training.check_quantizer_args(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    train, val, classes = datasets.imagenet(
        args.manual_dir, args.batch_size, args.image_size, args.data_dir
    )
    model = preact_resnet_imagenet(
        args.depth, width=args.width, classes=classes, bits=args.bits, naive=args.naive,
        window=args.window, stock=args.stock, input_shape=(args.image_size, args.image_size, 3),
    )
    steps = args.steps_per_epoch or TRAIN_IMAGES // args.batch_size
    optimizer = keras.optimizers.SGD(
        training.step_schedule(0.1 * args.batch_size / 256, steps, args.epochs),
        momentum=0.9, weight_decay=args.weight_decay,
    )
    model.compile(
        optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")],
        jit_compile=training.backend_jit_compile(args.jit_compile),
    )
    print(f"{model.name}: {model.count_params():,} parameters")
    summary = training.fit_and_summarize(
        model, train, val, args.epochs, args.out, steps_per_epoch=args.steps_per_epoch,
        extra={"bits": args.bits, "naive": args.naive,
               "window": args.window},
    )
    return summary


if __name__ == "__main__":
    main()
