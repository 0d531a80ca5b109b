"""Fidelity of the transformer units on real data: gradients, training, a bits sweep.

Two models, offline data (the Debian packages when installed, else the
subsets shipped with keras_blpa):

- `gpt`: a byte-level GPT-2 (`keras_hub.models.GPT2CausalLM`, vocabulary
  256, `keras_blpa.paired_runs`) on the Python documentation's reST sources;
- `vit`: a Functional ViT on Fashion-MNIST: 4x4 patches (49 tokens), a
  learned position embedding, `keras_hub.layers.TransformerEncoder` blocks
  (`normalize_first=True`, GELU, dropout 0.1), LayerNorm, average pooling,
  a Dense classifier.

A setting is `transformer_bits / derivative_bits` (`keras_blpa.convert`),
"exact" is `transformer_bits=None` (stock gradients) and "stock" the model
as built. Pieces, each resumable (results accumulate in `--out`):

- `cosine`: per weight variable, the cosine and relative error
  `|g - g_exact| / |g_exact|` of the weight gradients of each setting
  against exact, at the same weights, on the same batch, with the same
  dropout masks (both converted models draw them from the same seed states,
  passed to each; the losses agree to float rounding, since the forward is
  exact: `loss_gap`), averaged over `--batches` batches, at the initial
  weights and after `--pretrain-steps` steps of stock training. Variables
  group by block and unit: attention q/k/v, attention output, MLP in, MLP
  out, the two norms; "outside" is the embeddings, final norm and head.
- `train`: per seed, stock and BLPA (8 / 3, `convert`'s defaults) from the
  same initial weights on the same batches; the final test loss (GPT: bits
  per byte on `--test-windows` windows of held-out text; ViT: the 10,000
  test images, also accuracy), and the paired difference BLPA - stock
  with its 95% t interval. With `--exact`, also exact per seed, which draws
  BLPA's dropout masks: BLPA - exact is the gradients' effect alone.
- `sweep`: seed 0, exact and every setting, trained as in `train` (the 8 / 3
  run is `train`'s BLPA run of seed 0); each setting's difference from exact
  in units of the seed spread of stock in `train` (the noise scale).
- `report`: the markdown tables of everything in `--out`.

    export KERAS_BACKEND=jax
    B=benchmarks/transformer_fidelity.py; R=benchmarks/results/transformers
    flock /tmp/heavy.lock python $B cosine --model gpt --out $R/fidelity_gpt.json
    flock /tmp/heavy.lock python $B cosine --model vit --out $R/fidelity_vit.json
    flock /tmp/heavy.lock python $B train --model vit --seeds 0 1 2 --out $R/fidelity_vit.json
    flock /tmp/heavy.lock python $B sweep --model vit --out $R/fidelity_vit.json
    python $B report --out $R/fidelity_gpt.json $R/fidelity_vit.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SETTINGS = ("8/4", "8/3", "8/2", "8/1", "4/4", "4/3", "4/2", "4/1")
DEFAULT = "8/3"
UNITS = ("q/k/v", "attention out", "MLP in", "MLP out", "norms", "outside")
SIZES = {  # per model: architecture, training and test sizes of a full run
    "gpt": dict(layers=4, hidden_dim=128, heads=4, sequence_length=128, batch_size=16,
                learning_rate=2e-3, steps=120, test_windows=128),
    "vit": dict(layers=4, hidden_dim=64, heads=4, patch=4, batch_size=64,
                learning_rate=1e-3, steps=200),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("piece", choices=["cosine", "train", "sweep", "report"])
    p.add_argument("--model", choices=sorted(SIZES), default="gpt")
    p.add_argument("--out", nargs="+", required=True,
                   help="JSON results (read, extended, written); `report` reads several")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS),
                   help="settings bits/derivative_bits, or exact (cosine, sweep)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train: seeds")
    p.add_argument("--exact", action="store_true",
                   help="train: also exact per seed (stock gradients, BLPA's dropout masks)")
    p.add_argument("--batches", type=int, default=3, help="cosine: batches averaged")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="cosine: stock training steps before the second measurement "
                        "(default: --steps, as stock's training run of seed 0)")
    p.add_argument("--data", default="auto", choices=["auto", "debian", "subset"])
    for name, value in {**SIZES["gpt"], **SIZES["vit"]}.items():
        kind = float if isinstance(value, float) else int
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"default: {SIZES['gpt'].get(name, '-')} (gpt), "
                            f"{SIZES['vit'].get(name, '-')} (vit)")
    args = p.parse_args(argv)
    for name, value in SIZES[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.pretrain_steps is None:
        args.pretrain_steps = args.steps
    for setting in args.settings:
        if setting != "exact" and setting not in SETTINGS:
            p.error(f"--settings: {setting!r} is not exact or one of {' '.join(SETTINGS)}")
    if args.piece != "report" and len(args.out) != 1:
        p.error("--out: one file per model (only `report` reads several)")
    return args


def config(args) -> dict:
    """What a result depends on; results of another configuration are not mixed in."""
    keys = ["layers", "hidden_dim", "heads", "batch_size", "learning_rate", "steps"]
    keys += ["sequence_length", "test_windows"] if args.model == "gpt" else ["patch"]
    import keras

    return {"model": args.model, "backend": keras.backend.backend(), "data": args.data,
            **{k: getattr(args, k) for k in keys}}


# -- models and data ---------------------------------------------------------------------


def vit(seed: int, *, layers: int, hidden_dim: int, heads: int, patch: int,
        dropout: float = 0.1, image_size: int = 28, classes: int = 10):
    """The Functional ViT (module docstring); weights depend on `seed` only."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    images = keras.Input((image_size, image_size, 1))
    x = keras.layers.Conv2D(hidden_dim, patch, strides=patch, name="patches")(images)
    x = keras.layers.Reshape(((image_size // patch) ** 2, hidden_dim))(x)
    x = keras.layers.Add()([x, keras_hub.layers.PositionEmbedding(x.shape[1])(x)])
    for i in range(layers):
        x = keras_hub.layers.TransformerEncoder(
            2 * hidden_dim, heads, dropout=dropout, activation="gelu", normalize_first=True,
            name=f"block_{i}")(x)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(images, keras.layers.Dense(classes, name="head")(x), name="vit")


def build(args, seed: int):
    """The stock model of `args.model` with seed-`seed` weights."""
    from keras_blpa import paired_runs

    if args.model == "gpt":
        return paired_runs.byte_gpt(seed, layers=args.layers, hidden_dim=args.hidden_dim,
                                    heads=args.heads, sequence_length=args.sequence_length)
    return vit(seed, layers=args.layers, hidden_dim=args.hidden_dim, heads=args.heads,
               patch=args.patch)


def converted(model, setting: str):
    """`model` itself ("stock") or its `keras_blpa.convert` copy at `setting`."""
    import keras_blpa

    if setting == "stock":
        return model
    if setting == "exact":
        return keras_blpa.convert(model, transformer_bits=None)
    bits, derivative_bits = (int(b) for b in setting.split("/"))
    return keras_blpa.convert(model, transformer_bits=bits, derivative_bits=derivative_bits)


def compile_model(model, args) -> None:
    """Adam and cross-entropy (`paired_runs.compile_lm`); the ViT also counts accuracy."""
    import keras

    from keras_blpa import paired_runs

    if args.model == "gpt":
        paired_runs.compile_lm(model, args.learning_rate)
        return
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"],
                  jit_compile="auto" if keras.backend.backend() == "jax" else False)


class Data:
    """Training batches drawn by a seed, and the test set, of `args.model`."""

    def __init__(self, args):
        from keras_blpa import datasets, paired_runs

        self.args, self._windows = args, paired_runs.windows
        if args.model == "gpt":
            self.train, test, self.description = datasets.load_python_docs(args.data)
            self.test = paired_runs.windows(test, args.test_windows, args.sequence_length,
                                            np.random.default_rng(12345))
        else:
            self.train, self.test, self.description = datasets.load_fashion_mnist(args.data)

    def batches(self, seed: int, count: int):
        rng = np.random.default_rng(seed)
        for _ in range(count):
            if self.args.model == "gpt":
                yield self._windows(self.train, self.args.batch_size, self.args.sequence_length,
                                    rng)
            else:
                rows = rng.integers(0, len(self.train[0]), self.args.batch_size)
                yield self.train[0][rows], self.train[1][rows]


# -- gradients ---------------------------------------------------------------------------


def gradient_function(model):
    """`grads(trainable, seed_states, x, y) -> (loss, weight gradients)` of one
    training-mode batch of `model` at the given values of its trainable and
    non-trainable variables (the latter: its dropout seed states, so that two
    models given the same states draw the same masks). Compiled once per model
    on JAX."""
    import keras

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if keras.backend.backend() == "jax":
        import jax

        def loss(trainable, seed_states, x, y):
            out, _ = model.stateless_call(trainable, seed_states, x, training=True)
            return loss_fn(y, out)

        step = jax.jit(jax.value_and_grad(loss))
    else:
        import tensorflow as tf

        def step(trainable, seed_states, x, y):
            for variables, values in ((model.trainable_variables, trainable),
                                      (model.non_trainable_variables, seed_states)):
                for variable, value in zip(variables, values):
                    variable.assign(value)
            with tf.GradientTape() as tape:
                value = loss_fn(y, model(x, training=True))
            return value, tape.gradient(value, model.trainable_variables)

    def grads(trainable, seed_states, x, y) -> tuple[float, list[np.ndarray]]:
        value, g = step(trainable, seed_states, x, y)
        return float(value), [np.asarray(t, "float64").ravel() for t in g]

    return grads


def unit_of(path: str) -> tuple[str, str]:
    """`(block, unit)` of a weight variable's path (UNITS; block "" outside blocks)."""
    parts = path.split("/")
    names = {"query": "q/k/v", "key": "q/k/v", "value": "q/k/v",
             "attention_output": "attention out", "feedforward_intermediate_dense": "MLP in",
             "feedforward_output_dense": "MLP out", "self_attention_layer_norm": "norms",
             "feedforward_layer_norm": "norms"}
    unit = next((names[p] for p in parts[1:] if p in names), None)
    return ("", "outside") if unit is None else (parts[0], unit)


def agreement(g: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """Cosine and relative error of `g` against `exact`."""
    norm = np.linalg.norm(exact)
    cos = float(g @ exact / (np.linalg.norm(g) * norm + 1e-30))
    return cos, float(np.linalg.norm(g - exact) / (norm + 1e-30))


def cosine(args, data: Data) -> dict:
    """Per-variable agreement with exact of every setting, at init and trained."""
    stock = build(args, 0)
    batches = list(data.batches(10_000, args.batches))  # not the training batches
    reference = converted(stock, "exact")
    paths = [v.path for v in reference.trainable_variables]
    states = [np.asarray(v.value) for v in reference.non_trainable_variables]
    grads = {s: gradient_function(converted(stock, s)) for s in args.settings}
    exact_grads = gradient_function(reference)
    phases = {}
    for phase in ("init", "trained"):
        if phase == "trained" and args.pretrain_steps:
            compile_model(stock, args)
            for x, y in data.batches(0, args.pretrain_steps):
                stock.train_on_batch(x, y)
        if [v.path for v in stock.trainable_variables] != paths:
            raise RuntimeError("convert changed the order of the trainable variables")
        weights = [np.asarray(v.value) for v in stock.trainable_variables]
        exact = [exact_grads(weights, states, x, y) for x, y in batches]
        rows = {}
        for setting, setting_grads in grads.items():
            start, cos, rel, gap = time.perf_counter(), [], [], 0.0
            for (x, y), (loss_exact, g_exact) in zip(batches, exact):
                loss, g = setting_grads(weights, states, x, y)
                gap = max(gap, abs(loss - loss_exact))
                pairs = [agreement(a, r) for a, r in zip(g, g_exact)]
                cos.append([c for c, _ in pairs])
                rel.append([r for _, r in pairs])
            rows[setting] = {"loss_gap": gap, "variables": [
                {"path": p, "block": unit_of(p)[0], "unit": unit_of(p)[1],
                 "cos": float(np.mean(c)), "rel_err": float(np.mean(r))}
                for p, c, r in zip(paths, np.array(cos).T, np.array(rel).T)]}
            print(f"{args.model} {phase} {setting}: " + summary_line(rows[setting]) +
                  f" ({time.perf_counter() - start:.0f} s)", flush=True)
        phases[phase] = {"loss": float(np.mean([e[0] for e in exact])), "settings": rows}
    return {"batches": args.batches, "pretrain_steps": args.pretrain_steps,
            "phases": phases}


def unit_stats(row: dict, unit: str, kernels_only: bool = True) -> tuple[float, float]:
    """Worst cosine and median relative error over a unit's variables (its
    kernels by default: a bias's gradient is its output's summed gradient)."""
    chosen = [v for v in row["variables"] if v["unit"] == unit and
              (not kernels_only or v["path"].endswith(("kernel", "gamma", "embeddings")))]
    return (min(v["cos"] for v in chosen), float(np.median([v["rel_err"] for v in chosen])))


def summary_line(row: dict) -> str:
    return ", ".join(f"{u} {unit_stats(row, u)[0]:.4f}" for u in UNITS)


# -- training runs -----------------------------------------------------------------------


def train_run(args, data: Data, setting: str, seed: int) -> dict:
    """One run: seed-`seed` weights and batches, `setting`; test loss (and accuracy)."""
    import keras

    keras.backend.clear_session()
    model = converted(build(args, seed), setting)
    compile_model(model, args)
    start, curve, recent = time.perf_counter(), [], []
    for step, (x, y) in enumerate(data.batches(seed, args.steps), 1):
        recent.append(float(model.train_on_batch(x, y, return_dict=True)["loss"]))
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            curve.append([step, float(np.mean(recent))])
            recent = []
    x, y = data.test
    result = model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)
    run = {"setting": setting, "seed": seed, "seconds": time.perf_counter() - start,
           "train_curve": curve, "test_loss": float(result["loss"])}
    if args.model == "gpt":
        run["test_bits_per_byte"] = run["test_loss"] / math.log(2)
    else:
        run["test_accuracy"] = float(result["accuracy"])
    print(f"{args.model} {setting} seed {seed}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in run.items() if k.startswith("test")) +
        f" ({run['seconds']:.0f} s)", flush=True)
    return run


def ensure_runs(args, data: Data, results: dict, wanted: list[tuple[str, int]], save) -> None:
    runs = results.setdefault("runs", {})
    for setting, seed in wanted:
        key = f"{setting} seed {seed}"
        if key not in runs:
            runs[key] = train_run(args, data, setting, seed)
            save()


# -- report ------------------------------------------------------------------------------


def metrics(model: str) -> list[tuple[str, str, float]]:
    """`(key, label, scale)` of the test metrics reported for `model`."""
    if model == "gpt":
        return [("test_bits_per_byte", "test bits/byte", 1.0)]
    return [("test_accuracy", "test accuracy %", 100.0), ("test_loss", "test loss", 1.0)]


def stock_spread(results: dict, key: str) -> float:
    """The seed standard deviation of stock's `key` (the noise scale)."""
    values = [r[key] for r in results.get("runs", {}).values() if r["setting"] == "stock"]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _paired_rows(runs: dict, seeds: list, base: str, model: str) -> list[str]:
    """Table rows `| metric | base | BLPA | BLPA - base (mean +- 95% t) |` over `seeds`."""
    from keras_blpa import paired_runs

    lines = []
    for key, label, scale in metrics(model):
        paired = [(runs[f"{base} seed {s}"][key], runs[f"{DEFAULT} seed {s}"][key])
                  for s in seeds if f"{DEFAULT} seed {s}" in runs]
        if not paired:
            continue
        reference, blpa = (scale * np.array(v) for v in zip(*paired))
        mean, half = paired_runs.paired_interval(blpa - reference)
        digits = 2 if scale == 100 else 3
        lines.append(f"| {label} | {' / '.join(f'{v:.{digits}f}' for v in reference)} | "
                     f"{' / '.join(f'{v:.{digits}f}' for v in blpa)} | "
                     f"{mean:+.{digits}f} +- {half:.{digits}f} |")
    return lines


def report(results: dict) -> str:

    cfg, lines = results["config"], []
    name = {"gpt": "Byte-level GPT-2", "vit": "ViT on Fashion-MNIST"}[cfg["model"]]
    lines += [f"### {name}", "", "Configuration: " + ", ".join(
        f"{k} {v}" for k, v in cfg.items() if k != "model") + ".", ""]
    cos = results.get("cosine")
    if cos:
        lines += [f"Weight-gradient agreement with exact, same weights, batches and dropout "
                  f"masks, mean over {cos['batches']} batches; per unit the worst cosine over "
                  "its blocks' kernels (norms: gamma; outside: embeddings and kernels "
                  "outside the blocks) / the median relative error.", ""]
        for phase, title in (("init", "At the initial weights"),
                             ("trained", f"After {cos['pretrain_steps']} stock steps")):
            block = cos["phases"].get(phase)
            if not block:
                continue
            lines += [f"{title} (loss {block['loss']:.3f}):", "",
                      "| setting | " + " | ".join(UNITS) + " | loss gap |",
                      "|---|" + "---|" * (len(UNITS) + 1)]
            for setting, row in block["settings"].items():
                cells = ["{:.4f} / {:.3f}".format(*unit_stats(row, u)) for u in UNITS]
                lines.append(f"| {setting} | " + " | ".join(cells) +
                             f" | {row['loss_gap']:.1e} |")
            lines.append("")
    runs = results.get("runs", {})
    seeds = sorted({r["seed"] for r in runs.values() if r["setting"] == "stock"})
    if seeds:
        lines += [f"Training, {cfg['steps']} steps of batch {cfg['batch_size']}, seeds "
                  f"{', '.join(map(str, seeds))}: stock and BLPA ({DEFAULT}) from the same "
                  "weights on the same batches; difference BLPA - stock, mean +- 95% t "
                  "interval over the seeds.", "",
                  "| metric | stock | BLPA 8/3 | BLPA - stock |", "|---|---|---|---|"]
        lines += _paired_rows(runs, seeds, "stock", cfg["model"]) + [""]
        if all(f"exact seed {s}" in runs for s in seeds):
            lines += ["The same against exact (`transformer_bits=None`: stock gradients, "
                      "and the dropout masks BLPA draws, so the difference is the "
                      "gradients' alone):", "",
                      "| metric | exact | BLPA 8/3 | BLPA - exact |", "|---|---|---|---|"]
            lines += _paired_rows(runs, seeds, "exact", cfg["model"]) + [""]
    swept = [r for r in runs.values() if r["seed"] == 0 and r["setting"] != "stock"]
    if len(swept) > 1 and any(r["setting"] == "exact" for r in swept):
        order = ["exact", *SETTINGS]
        swept.sort(key=lambda r: order.index(r["setting"]))
        exact = next(r for r in swept if r["setting"] == "exact")
        keys = metrics(cfg["model"])
        lines += ["Bits sweep, seed 0, each setting against exact in the seed spread of "
                  "stock (sd over the training seeds above): `(setting - exact) / sd`.", "",
                  "| setting | " + " | ".join(f"{label} | in sd" for _, label, _ in keys) + " |",
                  "|---|" + "---|---|" * len(keys)]
        for run in swept:
            cells = []
            for key, _, scale in keys:
                sd = stock_spread(results, key)
                cells += [f"{scale * run[key]:.{2 if scale == 100 else 3}f}",
                          f"{(run[key] - exact[key]) / sd:+.1f}"]
            lines.append(f"| {run['setting']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------


def load(path: str) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def main(argv=None) -> dict:
    args = parse(argv)
    if args.piece == "report":
        text = "\n".join(report(load(path)) for path in args.out)
        print(text)
        return {"markdown": text}
    out = Path(args.out[0])
    results = load(out)
    if results.get("config", config(args)) != config(args):
        raise SystemExit(f"{out} holds results of {results['config']}; this run is "
                         f"{config(args)}: use another --out")
    results["config"] = config(args)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    data = Data(args)
    print(f"Data: {data.description}; {results['config']}", flush=True)
    if args.piece == "cosine":
        results["cosine"] = cosine(args, data)
        save()
    elif args.piece == "train":
        settings = ("stock", DEFAULT, "exact") if args.exact else ("stock", DEFAULT)
        ensure_runs(args, data, results, [(s, seed) for seed in args.seeds
                                          for s in settings], save)
    else:
        ensure_runs(args, data, results, [(s, 0) for s in ["exact", *args.settings]], save)
    print(report(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
