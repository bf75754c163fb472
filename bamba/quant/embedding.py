"""``QuantizedEmbedding``: token embeddings whose table stays quantized in memory (a scale per
row, or per group of a row), as llama.cpp keeps ``token_embd`` in its Q8_0 / Q4_0 files. A
lookup dequantizes only the rows it reads."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bamba.quant.formats import (QuantScheme, dequantize, pack_zero_points, quantize,
                                 unpack_zero_points)
from bamba.quant.linear import QuantizedLinear
from bamba.quant.weights import QuantizedWeights


class QuantizedEmbedding(QuantizedWeights):
    """``embedding(ids)`` -> [..., embedding_dim] in ``output_dtype`` (the model's activations
    dtype; it follows module casts as a floating-point parameter would)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme,
                 scale_dtype: torch.dtype = torch.bfloat16, per_tensor: bool = False,
                 output_dtype: torch.dtype | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, scheme, scale_dtype, per_tensor)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.output_dtype = output_dtype or scale_dtype

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: QuantScheme) -> QuantizedEmbedding:
        """``embedding``'s table quantized row by row (ValueError when the scheme's group size
        does not divide embedding_dim)."""
        tensors = quantize(embedding.weight, scheme)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, scheme,
                    tensors["weight_scale"].dtype, output_dtype=embedding.weight.dtype)
        layer.load_tensors(tensors)
        return layer

    def tied_head(self) -> QuantizedLinear:
        """An LM head tied to this table: a ``QuantizedLinear`` [num_embeddings, embedding_dim]
        holding this module's tensors themselves (no copy; on meta as well)."""
        tensors = self.quantized_tensors()
        scale = tensors.get("weight_scale")
        with torch.device("meta"):  # its own tensors are replaced by the table's
            head = QuantizedLinear(self.embedding_dim, self.num_embeddings, self.scheme,
                                   scale_dtype=torch.float32 if scale is None else scale.dtype,
                                   per_tensor=scale is not None and scale.dim() < 2)
        head.load_tensors(tensors)
        return head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        # The rows' codes and scales (a per-tensor scale, and weight_shape, whose width is all
        # unpacking reads, as they are).
        rows = {name: tensor[ids] if tensor.dim() >= 2 else tensor
                for name, tensor in self.quantized_tensors().items()
                if name != "weight_zero_point"}
        if self.scheme.zero_points:  # zero points lie packed down the rows: the rows' own
            zero_points = unpack_zero_points(self.weight_zero_point, self.scheme.bits,
                                             self.num_embeddings)[ids]
            rows["weight_zero_point"] = pack_zero_points(zero_points, self.scheme.bits)
        values = dequantize(rows, self.scheme, self.output_dtype)
        return values.view(*input_ids.shape, self.embedding_dim)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        self.output_dtype = fn(torch.empty(0, dtype=self.output_dtype)).dtype
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, {self._scheme_repr()}, "
                f"output_dtype={self.output_dtype}")
