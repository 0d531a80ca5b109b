"""Train a pre-activation ResNet on CIFAR-10/100 with BLPA (the paper's recipe).

SGD with momentum 0.9, weight decay 1e-4, batch 128, learning rate 0.1 divided
by 10 at 50% and 75% of training, 4-pixel pad + random crop + flip. Data come
from tensorflow-datasets (downloaded on first use).

    python examples/train_cifar.py --dataset cifar10 --depth 164 --bits 4
    python examples/train_cifar.py --dataset cifar100 --bits none      # exact
    python examples/train_cifar.py --bits 8 --naive                     # naive 8-bit
    python examples/train_cifar.py --bits none --width 0.25             # 1/4 features
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_blpa import datasets, training  # noqa: E402
from keras_blpa.models import preact_resnet_cifar  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    p.add_argument("--depth", type=training.cifar_depth, default=164,
                   help="9n+2: 164, 254, 488, 1001")
    p.add_argument("--width", type=training.positive_float, default=1.0,
                   help="channel multiplier")
    p.add_argument("--bits", type=training.bits_or_none, default=4,
                   help="4, 8 or none (exact)")
    p.add_argument("--naive", action="store_true", help="quantize the forward pass too")
    p.add_argument("--window", type=training.positive_float, default=None,
                   help="quantizer range in standard deviations (default: 6 at 4 bits, "
                        "12 at 8 bits; 6 is the paper's)")
    p.add_argument("--stock", action="store_true", help="stock Keras layers instead")
    p.add_argument("--epochs", type=training.positive_int, default=164)
    p.add_argument("--steps-per-epoch", type=training.positive_int, default=None)
    p.add_argument("--batch-size", type=training.positive_int, default=128)
    p.add_argument("--lr", type=training.positive_float, default=0.1)
    p.add_argument("--weight-decay", type=training.non_negative_float, default=1e-4)
    p.add_argument("--jit-compile", action="store_true", default=None,
                   help="XLA on TensorFlow too (pure-TF quantizer; JAX always compiles)")
    p.add_argument("--data-dir", default=None, help="tfds data directory")
    p.add_argument("--out", default="runs/cifar", help="folder for log.csv, summary.json")
    args = p.parse_args(argv)
    training.check_quantizer_args(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    train, test, classes = datasets.cifar(args.dataset, args.batch_size, args.data_dir)
    model = preact_resnet_cifar(
        args.depth, width=args.width, classes=classes, bits=args.bits, naive=args.naive,
        window=args.window, stock=args.stock,
    )
    steps = args.steps_per_epoch or 50_000 // args.batch_size
    training.compile_for_training(
        model, steps, args.epochs, base_lr=args.lr, weight_decay=args.weight_decay,
        jit_compile=training.backend_jit_compile(args.jit_compile),
    )
    print(f"{model.name}: {model.count_params():,} parameters on {args.dataset}")
    return training.fit_and_summarize(
        model, train, test, args.epochs, args.out, steps_per_epoch=args.steps_per_epoch,
        extra={"dataset": args.dataset, "bits": args.bits, "naive": args.naive,
               "window": args.window},
    )


if __name__ == "__main__":
    main()
