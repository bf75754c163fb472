"""``QuantizedLinear``: a linear layer whose weight stays quantized in memory, its buffers named
as compressed-tensors names them on disk. Its ``forward`` is the torch reference (dequantize
per call, never a cached dense copy); kernels read ``kernel_weights()``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bamba.linear_protocol import LinearWeights
from bamba.quant.formats import (
    FP8,
    QuantScheme,
    dequantize,
    packed_width,
    quantize,
    scale_shape,
)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held in ``scheme``'s tensors (``weight`` + ``weight_scale`` for fp8,
    ``weight_packed`` + ``weight_shape`` + ``weight_scale`` for ints); ``bias`` a parameter
    in the model's dtype, as ``nn.Linear``'s."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme,
                 bias: bool = False, scale_dtype: torch.dtype = torch.bfloat16,
                 per_tensor: bool = False) -> None:
        """Zeroed tensors of the scheme's shapes; one scale [1] when ``per_tensor``."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        n, k = out_features, in_features
        if scheme.packed:
            self.register_buffer("weight_packed",
                                 torch.zeros(n, packed_width(k, scheme.bits), dtype=torch.int32))
            self.register_buffer("weight_shape", torch.tensor([n, k], dtype=torch.int64))
        else:
            self.register_buffer("weight", torch.zeros(n, k, dtype=FP8))
        self.register_buffer("weight_scale",
                             torch.ones((1,) if per_tensor else scale_shape(scheme, n, k),
                                        dtype=scale_dtype))
        self.bias = nn.Parameter(torch.zeros(n, dtype=scale_dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> QuantizedLinear:
        """``linear`` quantized (ValueError when the scheme's group size does not divide it)."""
        return cls.from_tensors(quantize(linear.weight, scheme), scheme, linear.bias)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], scheme: QuantScheme,
                     bias: torch.Tensor | None = None) -> QuantizedLinear:
        """A layer holding ``tensors`` as they are (checked by the caller)."""
        scale = tensors["weight_scale"]
        if scheme.packed:
            n, k = (int(v) for v in tensors["weight_shape"])
        else:
            n, k = tensors["weight"].shape
        layer = cls(k, n, scheme, bias is not None, scale.dtype, per_tensor=scale.dim() < 2)
        for name in scheme.tensor_names():
            setattr(layer, name, tensors[name])
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.scheme.tensor_names()}

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """A fresh dense [out, in] weight in ``dtype`` (for the reference path and tests)."""
        return dequantize(self.quantized_tensors(), self.scheme, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def kernel_weights(self) -> LinearWeights:
        data = self.weight_packed if self.scheme.packed else self.weight
        return LinearWeights(self.scheme.name, data, self.bias, self.weight_scale)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """Module casts (``.to(dtype)``, ``.half()``) move the fp8 weight between devices but
        leave its dtype: it goes through ``fn`` as bytes."""
        fp8 = self._buffers.pop("weight", None)
        try:
            super()._apply(fn, recurse)
        finally:
            if fp8 is not None:
                self._buffers["weight"] = fn(fp8.view(torch.uint8)).view(FP8)
        return self

    def extra_repr(self) -> str:
        group = "channel" if self.scheme.group_size is None else f"group {self.scheme.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name} ({group}), bias={self.bias is not None}")
