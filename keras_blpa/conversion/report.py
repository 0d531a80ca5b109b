"""What `convert` did: the chains it fused and those it left stock, and why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chain:
    """One BatchNormalization -> activation chain that `convert` found.

    Attributes:
      layers: the stock layers' names in order (BN, activation, then any
        ZeroPadding2D / GlobalAveragePooling2D and the linear layer(s)).
      fused_as: the fused layer's name, or None if left stock.
      reason: why it was left stock (None if fused).
      model: the nested model it sits in ("" for the top level).
      linear: the main linear layer's name (fused chains).
      projection: the 1x1 projection Conv2D's name, if one was fused in.
      negative_slope: the fused activation's negative slope (fused chains):
        0.0 for a ReLU, that of the leaky ReLU otherwise.
      max_value: the fused capped ReLU's cap (6.0 for ReLU6), else None.
    """

    layers: tuple
    fused_as: str | None = None
    reason: str | None = None
    model: str = ""
    linear: str | None = None
    projection: str | None = None
    negative_slope: float | None = None
    max_value: float | None = None

    @property
    def fused(self) -> bool:
        return self.fused_as is not None


def _fused_text(chain: Chain) -> str:
    if chain.negative_slope:
        return f"{chain.fused_as} (leaky ReLU, negative_slope={chain.negative_slope:g})"
    if chain.max_value is not None:
        return f"{chain.fused_as} (capped ReLU, max_value={chain.max_value:g})"
    return chain.fused_as


@dataclass
class ConversionReport:
    """The chains `keras_blpa.convert` fused and left stock. `str()` is a table.

    Attributes:
      chains: every `Chain`, in model order.
      bits: the fused layers' `bits`.
      stock_layers: stock layers replaced (BN, ReLU, padding, pooling, linear).
      fused_layers: fused layers created.
      bns: with `bn_bits`, each BatchNormalization outside the chains: a
        one-layer `Chain`, "fused" when it became an
        `ApproxBatchNormalization`, else with the reason it stayed stock.
      bn_bits: `convert`'s `bn_bits`.
      pools: each `ZeroPadding2D -> MaxPooling2D` outside the chains: a
        two-layer `Chain`, "fused" when it became a `PaddedMaxPooling2D`.
      notes: what became of Functional subclasses (KerasHub backbones and
        tasks): what the result is and what it does not keep.
      blocks: each transformer block (a layer holding attention): a one-layer
        `Chain`, "fused" when it became a `keras_blpa.layers`
        TransformerEncoder / TransformerDecoder (or a bare
        MultiHeadAttention a `keras_blpa.layers.MultiHeadAttention`), else
        with its reason.
      transformer_bits, derivative_bits: `convert`'s, for the blocks.
      around_blocks: each stock LayerNormalization, Dropout and Dense outside
        the blocks of a model whose blocks converted (an embedding's norm and
        dropout, a final norm, a user's MLP): a one-layer `Chain`, "fused"
        when it became `keras_blpa.layers`' (a code of the norm's input, the
        dropout's seed, codes of the Dense's input and derivative), else with
        its reason.
    """

    chains: list = field(default_factory=list)
    bits: int | None = 4
    stock_layers: int = 0
    fused_layers: int = 0
    bns: list = field(default_factory=list)
    bn_bits: int | None = None
    pools: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    transformer_bits: int | None = 8
    derivative_bits: int = 3
    around_blocks: list = field(default_factory=list)

    @property
    def fused(self) -> list:
        return [c for c in self.chains if c.fused]

    @property
    def left(self) -> list:
        return [c for c in self.chains if not c.fused]

    def changes(self) -> tuple[int, int, int]:
        """How many layers were fused, approximated and pooled so far."""
        return (self.fused_layers, len(self.approximated),
                sum(c.fused for c in self.pools))

    @property
    def approximated(self) -> list:
        """Names of the BatchNormalization layers made `ApproxBatchNormalization`."""
        return [(f"{c.model}/" if c.model else "") + c.layers[0] for c in self.bns if c.fused]

    def __str__(self) -> str:
        bits = "exact (bits=None)" if self.bits is None else f"{self.bits}-bit"
        def count(n, word):
            return f"{n} {word}{'' if n == 1 else 's'}"

        lines = [] if self.blocks and not self.chains else [
            f"keras_blpa.convert: {count(len(self.fused), 'chain')} fused into "
            f"{count(self.fused_layers, bits + ' layer')} "
            f"({count(self.stock_layers, 'stock layer')} replaced), {len(self.left)} left stock",
        ]
        lines += [f"Note: {n}" for n in self.notes]
        if self.blocks:
            done = [c for c in self.blocks if c.fused]
            codes = ("exact tensors (transformer_bits=None)" if self.transformer_bits is None
                     else f"{self.transformer_bits}-bit codes, {self.derivative_bits}-bit "
                     "activation derivative")
            lines.append(f"keras_blpa.convert: transformer blocks: {len(done)} of "
                         f"{len(self.blocks)} train with BLPA ({codes})")
            lines += [f"  {'fused' if c.fused else 'stock'}  "
                      f"{(c.model + '/') if c.model else ''}{c.layers[0]}  "
                      f"{c.fused_as if c.fused else c.reason}" for c in self.blocks]
        if self.around_blocks:
            done = [c for c in self.around_blocks if c.fused]
            lines.append(f"keras_blpa.convert: around the blocks, {len(done)} of "
                         f"{len(self.around_blocks)} norms, dropouts and Dense layers keep "
                         "codes or seeds")
            lines += [f"  {'fused' if c.fused else 'stock'}  "
                      f"{(c.model + '/') if c.model else ''}{c.layers[0]}  "
                      f"{c.fused_as if c.fused else c.reason}" for c in self.around_blocks]
        header = [] if self.blocks and not self.chains else [("", "chain", "fused layer / reason")]
        rows = header + [
            (
                "fused" if c.fused else "stock",
                (f"{c.model}/" if c.model else "") + " -> ".join(c.layers),
                _fused_text(c) if c.fused else c.reason,
            )
            for c in self.chains
        ]
        width = [max((len(r[i]) for r in rows), default=0) for i in range(2)]
        lines += [f"  {a:<{width[0]}}  {b:<{width[1]}}  {c}".rstrip() for a, b, c in rows]
        if self.pools:
            pooled = [c for c in self.pools if c.fused]
            lines.append(
                f"ZeroPadding2D -> MaxPooling2D: {len(pooled)} of {len(self.pools)} pairs "
                "as PaddedMaxPooling2D (exact; the padded copy is not kept)"
            )
            lines += [f"  stock  {' -> '.join(c.layers)}  {c.reason}"
                      for c in self.pools if not c.fused]
        if self.bn_bits is not None:
            lines.append(
                f"BatchNormalization outside the chains (bn_bits={self.bn_bits}): "
                f"{len(self.approximated)} keep a {self.bn_bits}-bit input code "
                f"(ApproxBatchNormalization), {len(self.bns) - len(self.approximated)} "
                "left stock"
            )
            lines += [f"  stock  {(c.model + '/') if c.model else ''}{c.layers[0]}  {c.reason}"
                      for c in self.bns if not c.fused]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ConversionReport(fused={len(self.fused)}, left={len(self.left)}, "
            f"bits={self.bits})"
        )
