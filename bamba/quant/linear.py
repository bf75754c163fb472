"""``QuantizedLinear``: a linear layer whose weight stays quantized in memory. Its ``forward``
is the torch reference (dequantize per call); kernels read ``kernel_weights()``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bamba.linear_protocol import LinearWeights
from bamba.quant.formats import QuantScheme, quantize
from bamba.quant.weights import QuantizedWeights


class QuantizedLinear(QuantizedWeights):
    """y = x W^T + b with W [out, in] held quantized (``QuantizedWeights``); ``bias`` a
    parameter in the model's dtype, as ``nn.Linear``'s."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme,
                 bias: bool = False, scale_dtype: torch.dtype = torch.bfloat16,
                 per_tensor: bool = False) -> None:
        """Zeroed tensors of the scheme's shapes; one scale [1] when ``per_tensor``."""
        super().__init__(out_features, in_features, scheme, scale_dtype, per_tensor)
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> QuantizedLinear:
        """``linear`` quantized (ValueError when the scheme's group size does not divide it)."""
        return cls.from_tensors(quantize(linear.weight, scheme), scheme, linear.bias)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], scheme: QuantScheme,
                     bias: torch.Tensor | None = None) -> QuantizedLinear:
        """A layer holding ``tensors`` as they are (checked by the caller)."""
        n, k = cls.stored_shape(tensors, scheme)
        scale = tensors["weight_table" if scheme.offsets or scheme.two_level else "weight_scale"]
        dtype = torch.float32 if scale.dtype == torch.uint8 else scale.dtype  # a K table's bias
        layer = cls(k, n, scheme, bias is not None, dtype, per_tensor=scale.dim() < 2)
        layer.load_tensors(tensors)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def kernel_weights(self) -> LinearWeights:
        return super().kernel_weights()._replace(bias=self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self._scheme_repr()}, bias={self.bias is not None}")
