"""What fast paths read of a linear layer: its weight format and its tensors in that format.
Shared by the quantized layers (``bamba.quant``) and the kernels (``bamba.native``), which must
not import each other past the seam."""

from __future__ import annotations

from typing import NamedTuple

import torch

DENSE = "dense"  # a weight [out, in] in the activations' dtype


class LinearWeights(NamedTuple):
    """A linear's format ("dense", "fp8", "int8", "int4", "iq4", "int6", "int5") and tensors:
    ``weight`` is the dense or fp8 weight [N, K], the packed int32 words [N, K * bits / 32],
    iq4's bytes of nibbles [N, K / 2] (indices into IQ4's levels) or int6's and int5's bytes
    [N, bits * K / 8] (``bamba.quant.formats.pack_six_bits``, ``pack_five_bits``); ``scales``
    [N, G] (one
    per output channel when G == 1, else one per group of K // G inputs) for the quantized
    formats; asymmetric ints give float32 [N, 2, G] instead: a row's G scales, then its G
    offsets, w = q * scale + offset."""
    format: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    scales: torch.Tensor | None = None

    def rows(self, begin: int, end: int) -> LinearWeights:
        """Output rows [begin, end) (views: weight or packed words, bias and scales lie by
        row)."""
        return LinearWeights(self.format, self.weight[begin:end],
                             None if self.bias is None else self.bias[begin:end],
                             None if self.scales is None else self.scales[begin:end])
