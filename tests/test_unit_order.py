"""The order the transformer units' custom gradient imposes on TensorFlow's
graph executor (`keras_blpa.backend.tensorflow.autodiff.custom_vjp`).

An executor runs what it is given in any order the data allows: with one
inter-op thread it follows the outputs' chain and queues the rest behind it.
A code the outputs did not wait for was taken in the backward pass (its float
input held until then), and a weight gradient the input gradient did not wait
for ran at the end of the backward pass (its decoded activation held until
then): a 4-block GPT-2 kept 8.7 MiB per sample instead of 3.2.
"""

import tensorflow as tf

from keras_blpa.backend.tensorflow import autodiff


def _step_graph():
    def forward(x, w):
        saved = [tf.identity(x * 2.0, name="first_code"), tf.identity(x * 3.0, name="other_code")]
        return [tf.matmul(x, w, name="product")], saved, [w]

    def backward(saved, kept, grads):
        first, other = saved
        (w,) = kept
        (g,) = grads
        d_x = tf.identity(tf.matmul(g, w, transpose_b=True) * first, name="input_gradient")
        d_w = tf.matmul(other, g, transpose_a=True, name="weight_gradient")
        return [d_x, d_w]

    unit = autodiff.custom_vjp(forward, backward, "unit")

    @tf.function
    def step(x, w):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            (y,) = unit(x, w)
            loss = tf.reduce_sum(tf.square(y, name="loss_square"))
        return tape.gradient(loss, [x, w])

    function = step.get_concrete_function(tf.TensorSpec([4, 3]), tf.TensorSpec([3, 2]))
    return function.graph, function.outputs


def _ancestors(op) -> set[str]:
    """Names of every op `op` waits for, through data and control edges."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent.name not in seen:
                seen.add(parent.name)
                stack.append(parent)
    return seen


def _named(names: set[str], part: str) -> list[str]:
    return [name for name in names if name.split("/")[-1].startswith(part)]


def test_the_outputs_wait_for_every_code():
    graph, _ = _step_graph()
    (square,) = [op for op in graph.get_operations() if op.name.endswith("loss_square")]
    before = _ancestors(square)
    assert _named(before, "first_code") and _named(before, "other_code")


def test_no_gradient_leaves_a_unit_before_all_of_them_exist():
    _, (d_x, d_w) = _step_graph()
    assert _named(_ancestors(d_x.op), "weight_gradient")
    assert _named(_ancestors(d_w.op), "input_gradient")


def _sliced_attention_inputs(monkeypatch, slices: int) -> list:
    """The projection's input in each backward slice of an attention unit
    (`KERAS_BLPA_ATTENTION_SLICES`), traced in a step's graph."""
    from keras_blpa.transformer.attention_linear import attention_linear

    monkeypatch.setenv("KERAS_BLPA_ATTENTION_SLICES", str(slices))

    def project(o, w):
        return [tf.einsum("abcd,cde->abe", tf.identity(o, name="projection_input"), w)]

    @tf.function
    def step(q, k, v, w, g):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v, w])
            (out,) = attention_linear(q, k, v, None, tf.constant([1, 2]), [w], linear=project,
                                      scale=0.5, dot_equation="aecd,abcd->acbe",
                                      combine_equation="acbe,aecd->abcd", attention_dropout=0.1,
                                      dropout=0.0, bits=8)
            loss = tf.reduce_sum(out * tf.identity(g, name="upstream"))
        return tape.gradient(loss, [q, k, v, w])

    qkv = tf.TensorSpec([4, 8, 2, 4])
    graph = step.get_concrete_function(qkv, qkv, qkv, tf.TensorSpec([2, 4, 3]),
                                       tf.TensorSpec([4, 8, 3])).graph
    inputs = [op for op in graph.get_operations()
              if op.name.split("/")[-1].startswith("projection_input")]
    return [op for op in inputs if _named(_ancestors(op), "upstream")]


def test_attention_backward_slices_run_one_after_another(monkeypatch):
    """Each slice starts once the one before has its gradients: the executor
    would otherwise run the slices side by side, every slice's `s**2`
    tensors alive at once (what slicing is for)."""
    assert len(_sliced_attention_inputs(monkeypatch, 1)) == 1
    first, second = sorted(_sliced_attention_inputs(monkeypatch, 2),
                           key=lambda op: len(_ancestors(op)))
    assert first.name in _ancestors(second)


def _mlp_outer_inputs(monkeypatch, slices: int) -> tuple[list, list]:
    """The outer Dense's input `f(h)` in each slice of an MLP unit
    (`KERAS_BLPA_MLP_SLICES`), traced in a step's graph: the forward's and
    the backward's (the one whose ancestors include the upstream gradient)."""
    from keras_blpa.transformer.norm_mlp import norm_mlp

    monkeypatch.setenv("KERAS_BLPA_MLP_SLICES", str(slices))

    def outer(a, w):
        return [tf.matmul(tf.identity(a, name="outer_input"), w)]

    @tf.function
    def step(x, gamma, w1, w2, g):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, w1, w2])
            _, out = norm_mlp(x, gamma, tf.zeros_like(gamma), [w1], [w2], tf.constant([1, 2]),
                              inner=lambda y, w: [tf.matmul(y, w)], outer=outer, width=8,
                              epsilon=1e-5, activation="gelu", bits=8, dropout=0.1)
            loss = tf.reduce_sum(out * tf.identity(g, name="upstream"))
        return tape.gradient(loss, [x, gamma, w1, w2])

    graph = step.get_concrete_function(
        tf.TensorSpec([4, 8, 3]), tf.TensorSpec([3]), tf.TensorSpec([3, 8]),
        tf.TensorSpec([8, 3]), tf.TensorSpec([4, 8, 3])).graph
    inputs = [op for op in graph.get_operations()
              if op.name.split("/")[-1].startswith("outer_input")]
    backward = [op for op in inputs if _named(_ancestors(op), "upstream")]
    return [op for op in inputs if op not in backward], backward


def test_mlp_slices_run_one_after_another_in_both_passes(monkeypatch):
    """The MLP unit's slices run one after another in the forward and the
    backward pass: otherwise the executor would hold every slice's 4x-wide
    `h` and `f(h)` (or their gradients) at once."""
    forward, backward = _mlp_outer_inputs(monkeypatch, 1)
    assert len(forward) == len(backward) == 1
    for ops in _mlp_outer_inputs(monkeypatch, 2):
        first, second = sorted(ops, key=lambda op: len(_ancestors(op)))
        assert first.name in _ancestors(second)


def test_no_batch_sized_zeros_in_a_units_graph():
    """No unit builds a zero tensor the size of its activations (`zeros_like`
    of a static shape, or the gradient of a `where` against one): TensorFlow's
    graph optimizer folds those into constants that the step function holds
    from one step to the next (0.5 MiB per sample on a 12-block GPT-2)."""
    from keras_blpa.transformer.attention_linear import attention_linear

    @tf.function
    def step(q, w, g):
        with tf.GradientTape() as tape:
            tape.watch([q, w])
            mask = tf.linalg.band_part(tf.ones([4, 8, 8], tf.bool, name="ones"), -1, 0)
            (out,) = attention_linear(
                q, q, q, mask, tf.constant([1, 2]), [w],
                linear=lambda o, w: [tf.einsum("abcd,cde->abe", o, w)], scale=0.5,
                dot_equation="aecd,abcd->acbe", combine_equation="acbe,aecd->abcd",
                attention_dropout=0.1, dropout=0.1, bits=8)
            loss = tf.reduce_sum(out * g)
        return tape.gradient(loss, [q, w])

    graph = step.get_concrete_function(tf.TensorSpec([4, 8, 2, 4]), tf.TensorSpec([2, 4, 3]),
                                       tf.TensorSpec([4, 8, 3])).graph
    outputs = 4 * 8 * 3  # the unit's output elements: fewer than its probabilities
    zeros = [op.name for op in graph.get_operations()
             if op.type in ("Const", "Fill", "ZerosLike", "BroadcastTo") and op.name != "ones"
             and op.outputs[0].shape.is_fully_defined() and op.outputs[0].consumers()
             and op.outputs[0].shape.num_elements() >= outputs]
    assert not zeros, zeros
