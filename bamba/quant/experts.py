"""``QuantizedExpertWeights``: a mixture's stacked expert weights [experts, rows, cols] held
quantized as one [experts * rows, cols] weight (``QuantizedWeights``), each expert's rows
contiguous, so a kernel streams one expert's slice alone. GGUF files quantize experts so
(llama.cpp's ``ffn_*_exps``, Q8_0 / Q4_0 blocks); no compressed-tensors layout holds them, so
a model with these is not saved back (``unsaved``)."""

from __future__ import annotations

import torch

from bamba.linear_protocol import LinearWeights
from bamba.quant.formats import QuantScheme, dequantize
from bamba.quant.weights import QuantizedWeights


class QuantizedExpertWeights(QuantizedWeights):
    unsaved = ("its experts' weights are quantized (read from a GGUF file), which no "
               "compressed-tensors layout holds")

    def __init__(self, experts: int, out_features: int, in_features: int, scheme: QuantScheme,
                 scale_dtype: torch.dtype = torch.float16) -> None:
        super().__init__(experts * out_features, in_features, scheme, scale_dtype)
        self.experts, self.out_features, self.in_features = experts, out_features, in_features

    def stacked(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense [experts, out, in] weights in ``dtype``."""
        return self.dequantized_weight(dtype).view(self.experts, self.out_features,
                                                   self.in_features)

    def expert_weights(self, index: int) -> LinearWeights:
        """Expert ``index``'s slice in the kernels' terms (views of its rows)."""
        return self.kernel_weights().rows(index * self.out_features,
                                          (index + 1) * self.out_features)

    def expert(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``index``'s dense [out, in] weight in ``dtype`` (the torch reference path
        dequantizes the experts a call picks, one at a time)."""
        rows = slice(index * self.out_features, (index + 1) * self.out_features)
        tensors = {name: t[rows] if name != "weight_shape" else
                   torch.tensor([self.out_features, self.in_features])
                   for name, t in self.quantized_tensors().items()}
        return dequantize(tensors, self.scheme, dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, out_features={self.out_features}, "
                f"in_features={self.in_features}, {self._scheme_repr()}")
