"""Activation memory and step time of KerasHub transformers, stock against BLPA.

The model is a KerasHub backbone with random weights (no download), GPT-2
or BERT, with `--layers` blocks of hidden size 256, 4 heads, MLP 1024,
sequence 128, vocabulary 1000, dropout as KerasHub's default (0.1), trained
with a mean-squared loss on its sequence output; with `--head`, the task
(`GPT2CausalLM`: causal LM loss over the vocabulary; `BertTextClassifier`:
two classes). `--model mha` is a user's Functional model of the same sizes
built from stock Keras layers (`mha_model`): pre-norm blocks of
`keras.layers.MultiHeadAttention` (causal) and a Dense GELU MLP, where
`convert` swaps the attention layers and the norms and dropouts around them;
the MLP's Dense layers stay stock (no `remat` variant). `--model llama` is
KerasHub's `LlamaBackbone` of the same sizes with 2 key/value heads
(grouped-query attention), a SwiGLU MLP of 1024 and no dropout (KerasHub's
default); `convert` makes its blocks `keras_blpa.layers.LlamaTransformerDecoder`
(`--head`: `LlamaCausalLM`). `--model gemma` is KerasHub's `GemmaBackbone`
(a Gemma 1 configuration) of the same sizes with 1 key/value head, head size
64, a GeGLU MLP of 1024 (KerasHub's `intermediate_dim` 2048: gate and up
take half each) and no dropout; its blocks become
`keras_blpa.layers.GemmaDecoderBlock` (`--head`: `GemmaCausalLM`). Variants:

- `stock`: as KerasHub builds it;
- `remat`: built under `keras.RematScope(mode="list_of_layers")` over every
  block's Dense / EinsumDense / LayerNormalization sublayers
  (`jax.checkpoint` / `tf.recompute_grad` each). Whole blocks cannot be
  rematerialized this way in Keras 3.15: `RematScope` wraps the block's call
  with all its arguments, and KerasHub's blocks take keyword arguments
  (TensorFlow: "The custom_gradient decorator currently supports keywords
  arguments only when eager execution is enabled") and a Python `training`
  flag (JAX traces it: "Attempted boolean conversion");
- `exact`: `keras_blpa.convert(model, transformer_bits=None)` (float tensors);
- `default`: `keras_blpa.convert(model)` (8-bit row codes, 3-bit derivative);
- `lean`: `transformer_bits=4, derivative_bits=1`.

Memory per sample is the slope between two batch sizes of what the training
step needs:

- JAX: XLA's temp buffer of the compiled `train_step` (`memory_analysis()`),
  in this process (nothing runs);
- TensorFlow: the peak of the BFC allocator (`TF_CPU_ALLOCATOR_USE_BFC=true`)
  over a `train_on_batch` after two warm-up steps, the lowest of three steps,
  in a fresh process per variant and batch size.

`codes` is what the units keep per sample by construction (row codes, their
per-row floats, derivative codes, 1-bit masks), the floor the measured
slope approaches; the rest is one block's transient working set and what
stays stock (embeddings, the head, the loss).

`--sequence-length` changes the tokens per sample (and the position table);
the JSON rows record it, `KERAS_BLPA_ATTENTION_SLICES` and
`KERAS_BLPA_MLP_SLICES` (the attention backward's and the MLP unit's batch
slices: `docs/transformers.md`).

`--time` also times `train_on_batch` at the larger batch size, all variants
interleaved in one process (rounds of one step each, after warm-up), and
reports the median per variant and its ratio to stock.

    python benchmarks/transformer_memory.py --model gpt2 --layers 4
    KERAS_BACKEND=jax python benchmarks/transformer_memory.py --model bert --layers 12 --time
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("stock", "remat", "exact", "default", "lean")
SIZES = dict(vocabulary_size=1000, num_heads=4, hidden_dim=256, intermediate_dim=1024,
             max_sequence_length=128)
LLAMA_KV_HEADS = 2  # --model llama: grouped-query attention, 2 query heads per k/v head
GEMMA_KV_HEADS = 1  # --model gemma: multi-query attention, as Gemma 2B
KV_HEADS = {"llama": LLAMA_KV_HEADS, "gemma": GEMMA_KV_HEADS}


def mha_model(layers: int, dropout: float = 0.1):
    """A Functional model of stock Keras layers: token and position embeddings,
    `layers` pre-norm blocks (LayerNorm -> causal MultiHeadAttention ->
    dropout -> add; LayerNorm -> Dense GELU -> Dense -> dropout -> add), a
    final LayerNorm; `SIZES`."""
    import keras

    h, heads, seq = SIZES["hidden_dim"], SIZES["num_heads"], SIZES["max_sequence_length"]
    tokens = keras.Input((seq,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(SIZES["vocabulary_size"], h)(tokens)
    positions = keras.layers.Embedding(seq, h)(keras.ops.arange(seq)[None])
    x = keras.layers.Add()([x, positions])
    for i in range(layers):
        y = keras.layers.LayerNormalization(name=f"block{i}_attention_norm")(x)
        y = keras.layers.MultiHeadAttention(heads, h // heads, dropout=dropout,
                                            name=f"block{i}_attention")(
            y, y, use_causal_mask=True)
        x = keras.layers.Add()([x, keras.layers.Dropout(dropout)(y)])
        y = keras.layers.LayerNormalization(name=f"block{i}_mlp_norm")(x)
        y = keras.layers.Dense(SIZES["intermediate_dim"], activation="gelu")(y)
        y = keras.layers.Dense(h)(y)
        x = keras.layers.Add()([x, keras.layers.Dropout(dropout)(y)])
    return keras.Model(tokens, keras.layers.LayerNormalization()(x))


def build(model: str, layers: int, variant: str, policy: str, head: bool = False):
    """The task of `variant` (module docstring), compiled."""
    import keras

    import keras_blpa

    keras.config.set_dtype_policy(policy)
    options = {"exact": dict(transformer_bits=None), "default": {},
               "lean": dict(transformer_bits=4, derivative_bits=1)}
    jit = "auto" if keras.backend.backend() == "jax" else False
    if model == "mha":
        if variant == "remat" or head:
            raise ValueError("--model mha has no remat variant and no --head.")
        keras.utils.set_random_seed(0)
        built = mha_model(layers)
        if variant in options:
            built = keras_blpa.convert(built, **options[variant])
        built.compile(optimizer="sgd", loss="mse", jit_compile=jit)
        return built
    import keras_hub

    cls = {"gpt2": keras_hub.models.GPT2Backbone, "bert": keras_hub.models.BertBackbone,
           "llama": keras_hub.models.LlamaBackbone, "gemma": keras_hub.models.GemmaBackbone}[model]
    names = ["query", "key", "value", "attention_output", "self_attention_layer_norm",
             "feedforward_layer_norm", "feedforward_intermediate_dense",
             "feedforward_output_dense"]
    sizes = dict(SIZES)
    if model == "llama":
        names += ["self_attention_layernorm", "feedforward_layernorm", "feedforward_gate_dense"]
        sizes.update(num_query_heads=sizes.pop("num_heads"), num_key_value_heads=LLAMA_KV_HEADS)
        del sizes["max_sequence_length"]  # rotary embeddings: no position table
    if model == "gemma":
        names = ["query", "key", "value", "attention_output", "pre_attention_norm",
                 "pre_ffw_norm", "ffw_gating", "ffw_gating_2", "ffw_linear"]
        sizes.update(num_query_heads=sizes.pop("num_heads"), num_key_value_heads=GEMMA_KV_HEADS,
                     head_dim=sizes["hidden_dim"] // SIZES["num_heads"],
                     intermediate_dim=2 * sizes["intermediate_dim"])  # gate and up: half each
        del sizes["max_sequence_length"]
    if variant == "remat":
        with keras.RematScope(mode="list_of_layers", layer_names=names):
            backbone = cls(num_layers=layers, **sizes)
    else:
        keras.utils.set_random_seed(0)
        backbone = cls(num_layers=layers, **sizes)
    if not head:  # the backbone alone, a mean-squared loss on its sequence output
        if variant in options:
            backbone = keras_blpa.convert(backbone, **options[variant])
        output = backbone.output
        output = output["sequence_output"] if isinstance(output, dict) else output
        model = keras.Model(backbone.input, output)
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
        return model
    if model in ("gpt2", "llama", "gemma"):
        lm = {"gpt2": keras_hub.models.GPT2CausalLM, "llama": keras_hub.models.LlamaCausalLM,
              "gemma": keras_hub.models.GemmaCausalLM}[model]
        task = lm(backbone=backbone, preprocessor=None)
    else:
        task = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2,
                                                   preprocessor=None)
    if variant in options:
        task = keras_blpa.convert(task, **options[variant])
    task.compile(optimizer="sgd",
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 jit_compile=jit)
    return task


def batch(model: str, size: int, head: bool = False):
    import numpy as np

    rng = np.random.default_rng(0)
    seq = SIZES["max_sequence_length"]
    ids = rng.integers(0, SIZES["vocabulary_size"], (size, seq)).astype("int32")
    if model == "mha":
        return ids, np.zeros((size, seq, SIZES["hidden_dim"]), "float32")
    x = {"token_ids": ids, "padding_mask": np.ones((size, seq), bool)}
    if model == "bert":
        x["segment_ids"] = np.zeros((size, seq), "int32")
    if not head:
        return x, np.zeros((size, seq, SIZES["hidden_dim"]), "float32")
    if model == "bert":
        return x, rng.integers(0, 2, (size,)).astype("int32")
    return x, x["token_ids"]


def codes_bytes_per_sample(layers: int, variant: str, policy: str = "float32",
                           model: str = "gpt2") -> float:
    """What the units keep per sample (module docstring); stock and remat: 0.
    `exact` keeps the tensors themselves, in the compute dtype. `mha`: the
    attention layers' (their input, q, k, v), the blocks' two norms and the
    MLP's Dense layers (their inputs, the GELU's derivative code)."""
    if variant in ("stock", "remat"):
        return 0.0
    h, heads, inner, seq = (SIZES[k] for k in
                            ("hidden_dim", "num_heads", "intermediate_dim", "max_sequence_length"))
    bits = {"exact": None, "default": 8, "lean": 4}[variant]
    derivative_bits = {"default": 3, "lean": 1}.get(variant)
    if model == "mha":
        size = 2 if policy == "mixed_bfloat16" else 4
        per_token = ((6 * h + h + inner) * size + 2 * 4 if bits is None
                     else 3 * (h * bits / 8 + 8) + 2 * 4 + 3 * (h * bits / 8 + 8 * heads)
                     + (h * bits / 8 + 8) + inner * 4 / (32 // derivative_bits)  # MLP in
                     + (inner * bits / 8 + 8))  # MLP out
    elif model in KV_HEADS:  # Llama's and Gemma's blocks (gated MLP of width `inner`)
        kv = KV_HEADS[model] * h // heads  # k's (and v's) features per token
        if bits is None:  # the norms' inputs, q, k, v, gate and up
            size = 2 if policy == "mixed_bfloat16" else 4
            per_token = size * (2 * h + h + 2 * kv + 2 * inner) + 4 * 2
        else:
            per_token = (2 * (h * bits / 8 + 8)  # two norm codes (+ lo, scale)
                         + h * bits / 8 + 8 * heads  # q rows per head
                         + 2 * (kv * bits / 8 + 8 * KV_HEADS[model])  # k, v
                         + 2 * (inner * bits / 8 + 8)  # f(gate) and up row codes
                         + inner * 4 / (32 // derivative_bits) + 2 * 4)  # gate's f', inv
    elif bits is None:  # the norms' inputs, q, k, v and the MLP's pre-activation
        size = 2 if policy == "mixed_bfloat16" else 4
        per_token = size * (2 * h + 3 * h + inner) + 4 * 2
    else:
        per_token = (2 * (h * bits / 8 + 8)  # two norm codes (+ lo, scale)
                     + 3 * (h * bits / 8 + 8 * heads)  # q, k, v rows per head
                     + inner * bits / 8 + 8  # the activation's row code
                     + inner * 4 / (32 // derivative_bits) + 2 * 4)  # derivative words, inv
    return layers * seq * (per_token + seq / 8)  # + the 1-bit attention mask


def jax_temp_bytes(task, model: str, size: int, head: bool) -> int:
    from keras_blpa import profiling

    return profiling.batch_temp_bytes(task, *batch(model, size, head))


def tf_peak_child(model: str, layers: int, variant: str, policy: str, size: int,
                  head: bool) -> int:
    from keras_blpa import profiling

    task = build(model, layers, variant, policy, head)
    return profiling.batch_peak_bytes(task, *batch(model, size, head), device="CPU:0")


def tf_peak(args, variant: str, size: int) -> int:
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true", "KERAS_BACKEND": "tensorflow"}
    cmd = [sys.executable, __file__, "--child", variant, str(size), "--model", args.model,
           "--layers", str(args.layers), "--policy", args.policy,
           "--sequence-length", str(args.sequence_length)]
    cmd += ["--head"] if args.head else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{variant} at batch {size} failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def _error_line(text: str) -> str:
    """The line of a traceback that says what went wrong."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "\x1b[1m" in line or "[1m" in line:  # Keras's bold message
            return line.replace("\x1b[1m", "").replace("\x1b[0m", "").replace("[1m", "")\
                .replace("[0m", "")[:300]
    errors = [line for line in lines if "Error" in line]
    return (errors or lines or ["failed"])[-1][:300]


def step_times(args) -> dict:
    """Median seconds of one `train_on_batch` per variant, interleaved."""
    import numpy as np

    tasks = {v: build(args.model, args.layers, v, args.policy, args.head) for v in args.variants}
    x, y = batch(args.model, args.batch_sizes[-1], args.head)
    for task in tasks.values():
        for _ in range(2):
            task.train_on_batch(x, y)
    times = {v: [] for v in tasks}
    for _ in range(args.rounds):
        for v, task in tasks.items():
            start = time.perf_counter()
            task.train_on_batch(x, y)
            times[v].append(time.perf_counter() - start)
    return {v: float(np.median(t)) for v, t in times.items()}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=["gpt2", "bert", "mha", "llama", "gemma"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch-sizes", type=int, nargs=2, default=(2, 6))
    p.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16"])
    p.add_argument("--sequence-length", type=int, default=SIZES["max_sequence_length"],
                   help="tokens per sample (the position table's size too)")
    p.add_argument("--head", action="store_true",
                   help="train the task (GPT2CausalLM, BertTextClassifier), not the backbone")
    p.add_argument("--time", action="store_true", help="also time the steps, interleaved")
    p.add_argument("--rounds", type=int, default=7, help="timed steps per variant")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    SIZES["max_sequence_length"] = args.sequence_length
    if args.child:
        print(tf_peak_child(args.model, args.layers, args.child[0], args.policy,
                            int(args.child[1]), args.head))
        return []
    import keras

    backend = keras.backend.backend()
    small, large = args.batch_sizes
    rows = []
    for variant in args.variants:
        row = dict(model=args.model, head=args.head, layers=args.layers, variant=variant,
                   backend=backend,
                   policy=args.policy, batch_sizes=[small, large],
                   sequence_length=args.sequence_length,
                   attention_slices=os.environ.get("KERAS_BLPA_ATTENTION_SLICES", "default"),
                   mlp_slices=os.environ.get("KERAS_BLPA_MLP_SLICES", "default"),
                   codes_mib_per_sample=codes_bytes_per_sample(args.layers, variant,
                                                               args.policy, args.model) / 2**20)
        try:
            if backend == "jax":
                task = build(args.model, args.layers, variant, args.policy, args.head)
                used = [jax_temp_bytes(task, args.model, b, args.head) for b in (small, large)]
            else:
                used = [tf_peak(args, variant, b) for b in (small, large)]
        except Exception as err:  # noqa: BLE001 - a variant that fails is reported
            row["error"] = _error_line(str(err))
        else:
            row.update(bytes=used, mib_per_sample=(used[1] - used[0]) / (large - small) / 2**20)
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows_ok = [r for r in rows if "error" not in r]
    if args.time:
        args.variants = [r["variant"] for r in rows_ok]
        times = step_times(args)
        for row in rows_ok:
            row["step_s"] = times[row["variant"]]
    stock = next((r for r in rows_ok if r["variant"] == "stock"), None)
    what = "task" if args.head else "Functional model" if args.model == "mha" else "backbone"
    print(f"\n{args.model} {what}, {args.layers} layers, {backend}, {args.policy}: "
          "MiB per sample")
    print("| variant | measured | codes | vs stock |" + (" step s | time vs stock |"
                                                          if args.time else ""))
    print("|---|---|---|---|" + ("---|---|" if args.time else ""))
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | fails: {r['error']} | | |")
            continue
        ratio = f"{stock['mib_per_sample'] / r['mib_per_sample']:.2f}x less" if stock else ""
        line = (f"| {r['variant']} | {r['mib_per_sample']:.3f} | "
                f"{r['codes_mib_per_sample']:.3f} | {ratio} |")
        if args.time:
            line += f" {r['step_s']:.3f} | {r['step_s'] / stock['step_s']:.2f}x |" if stock \
                else f" {r['step_s']:.3f} | |"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
