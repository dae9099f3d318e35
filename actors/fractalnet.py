"""FractalNet (Larsson, Maire & Shakhnarovich 2016) for 32x32 RGB images.

The configuration Dharmaretnam & Fyshe (2021) trained on CIFAR-100: 5 fractal blocks
of 3 columns, 64/128/256/512/512 channels, dropout 0/0.1/0.2/0.3/0.4 by block,
drop-path 0.15, half of the mini-batches sampled globally. Each conv unit is conv ->
dropout -> batch norm -> ReLU, the order of Larsson's code and the authors' (:class:`ConvUnit`).

A block of C columns is Larsson's expansion ``f_1 = conv``,
``f_{C+1}(z) = join(f_C(f_C(z)), conv(z))`` drawn as columns: column ``c``
(0 the shallowest) is ``2**c`` conv units, each spanning ``2**(C-1-c)`` of the
block's ``2**(C-1)`` depth steps, and a join at a depth averages every column that
ends there. As in the paper's figure 1 the last join takes all C columns at once
(a mean of C inputs, not nested means of pairs).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# per block, per join (in depth order), per input (in column order): is the input kept?
JoinMasks = tuple[tuple[tuple[bool, ...], ...], ...]


@dataclass(frozen=True)
class DropPath:
    """One mini-batch's drop-path draw for a whole FractalNet.

    ``mode`` is "global" (only ``column`` survives, in every block) or "local"
    (each join drops each input independently, keeping at least one);
    ``keep[block][join][input]`` says which join inputs survive, joins in the order
    of ``FractalBlock.join_inputs``.
    """

    mode: str
    column: int | None
    keep: JoinMasks


class ConvUnit(nn.Sequential):
    """Conv3x3 -> Dropout -> BatchNorm -> ReLU: (n, c_in, h, w) -> (n, c_out, h, w).

    The order of Larsson's Caffe code (the ``conv`` macro of gustavla/fractalnet's
    ``generation/globals.crox``: Convolution, Dropout, BatchNorm, ReLU) and of the Keras
    FractalNet the 2021 authors trained (snf/keras-fractalnet's ``fractal_conv``):
    batch norm normalises the dropped-out convolution, and the unit's output is the
    ReLU's. In eval mode dropout is the identity, so only training differs from the
    other common order (dropout last).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                # Identity when the rate is 0 keeps the first block's graph free of no-op nodes.
                drop=nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU(),
            )
        )


class FractalBlock(nn.Module):
    """One fractal block: (n, in_channels, h, w) -> (n, out_channels, h, w).

    ``columns[c]`` holds column c's ``2**c`` conv units; the first unit of every
    column maps ``in_channels`` to ``out_channels``. ``join_inputs`` lists, for each
    join (a depth where two or more columns end), the columns it averages.

    Parameters
    ----------
    in_channels, out_channels : int
    columns : int
        C >= 1; the block is ``2**(C-1)`` conv units deep and has ``2**C - 1`` of them.
    dropout : float
        Dropout rate after every conv unit of the block.
    """

    def __init__(self, in_channels: int, out_channels: int, columns: int, dropout: float):
        super().__init__()
        if columns < 1:
            raise ValueError(f"a fractal block needs at least one column, got {columns}")
        self.depth = 2 ** (columns - 1)
        self.span = [2 ** (columns - 1 - c) for c in range(columns)]
        self.columns = nn.ModuleList(
            nn.ModuleList(ConvUnit(in_channels if k == 0 else out_channels, out_channels, dropout) for k in range(2**c))
            for c in range(columns)
        )
        # depth step d (1-based) -> the columns whose conv unit ends there
        self.ending = {d: tuple(c for c in range(columns) if d % self.span[c] == 0) for d in range(1, self.depth + 1)}
        self.join_depths = tuple(d for d, cols in self.ending.items() if len(cols) > 1)
        self.join_inputs = tuple(self.ending[d] for d in self.join_depths)

    def forward(self, x: torch.Tensor, keep: Sequence[Sequence[bool]] | None = None) -> torch.Tensor:
        """x: (n, in_channels, h, w) -> (n, out_channels, h, w).

        ``keep`` (training only) says, per join, which inputs survive drop-path;
        None (eval) averages every input of every join. Conv units whose output no
        surviving path uses are not run, so dropped paths neither cost time nor
        move BatchNorm's running statistics.
        """
        kept = dict(self.ending)
        if keep is not None:
            for d, inputs, mask in zip(self.join_depths, self.join_inputs, keep, strict=True):
                kept[d] = tuple(c for c, k in zip(inputs, mask, strict=True) if k)
        # Walk back from the block output: a depth's result is needed when a kept unit reads it.
        needed = {self.depth}
        for d in range(self.depth, 0, -1):
            if d in needed:
                needed.update(d - self.span[c] for c in kept[d])
        out = {0: x}
        for d in range(1, self.depth + 1):
            if d not in needed:
                continue
            ys = [self.columns[c][d // self.span[c] - 1](out[d - self.span[c]]) for c in kept[d]]
            out[d] = ys[0] if len(ys) == 1 else torch.stack(ys).mean(0)
        return out[self.depth]


class FractalNet(nn.Module):
    """FractalNet for 32x32 RGB input: (n, 3, 32, 32) float -> logits (n, num_classes).

    Each block is followed by a 2x2 max-pool; after the last, a global average pool
    (1x1 already at 32x32 input) and one linear classifier.

    In training every mini-batch draws one :class:`DropPath` from torch's global RNG
    (reproducible under ``torch.manual_seed``): with probability
    ``global_drop_ratio`` one column, chosen uniformly, is the whole network;
    otherwise each join drops each of its inputs with probability ``drop_path``,
    keeping one chosen uniformly when all would go. Joins average the kept inputs.
    In eval mode nothing is dropped.

    Parameters
    ----------
    num_classes : int
    channels : one output width per block
    columns : int, columns per block
    dropout : one dropout rate per block
    drop_path : float, local drop probability of each join input
    global_drop_ratio : float, fraction of mini-batches sampled globally
    """

    def __init__(
        self,
        num_classes: int = 100,
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        columns: int = 3,
        dropout: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4),
        drop_path: float = 0.15,
        global_drop_ratio: float = 0.5,
    ):
        super().__init__()
        if len(dropout) != len(channels):
            raise ValueError(f"one dropout rate per block: {len(channels)} blocks, {len(dropout)} rates")
        self.num_classes = num_classes
        self.n_columns = columns
        self.drop_path = drop_path
        self.global_drop_ratio = global_drop_ratio
        widths = [3, *channels]
        self.blocks = nn.ModuleList(
            FractalBlock(widths[i], widths[i + 1], columns, dropout[i]) for i in range(len(channels))
        )
        self.pools = nn.ModuleList(nn.MaxPool2d(2) for _ in channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def sample_drop_path(self) -> DropPath:
        """Draw one mini-batch's drop-path pattern from torch's global RNG."""
        if torch.rand(()).item() < self.global_drop_ratio:
            column = int(torch.randint(self.n_columns, ()).item())
            keep = tuple(tuple(tuple(c == column for c in inputs) for inputs in b.join_inputs) for b in self.blocks)
            return DropPath("global", column, keep)
        masks = []
        for block in self.blocks:
            per_join = []
            for inputs in block.join_inputs:
                mask = torch.rand(len(inputs)) >= self.drop_path
                if not mask.any():
                    mask[torch.randint(len(inputs), ())] = True
                per_join.append(tuple(mask.tolist()))
            masks.append(tuple(per_join))
        return DropPath("local", None, tuple(masks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, 3, 32, 32) float -> logits (n, num_classes); drop-path only in training."""
        # fx traces with self.training a constant (False in eval): the traced graph is the eval path.
        return self.forward_paths(x, self.sample_drop_path() if self.training else None)

    def forward_paths(self, x: torch.Tensor, drop: DropPath | None) -> torch.Tensor:
        """x: (n, 3, 32, 32) float -> logits (n, num_classes) with a given drop-path draw (None: keep all)."""
        for i, (block, pool) in enumerate(zip(self.blocks, self.pools)):
            x = pool(block(x, None if drop is None else drop.keep[i]))
        return self.fc(torch.flatten(self.avgpool(x), 1))
