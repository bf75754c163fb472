"""``QuantizedWeights``: a module whose 2-D weight stays quantized in memory, its buffers named
as compressed-tensors names them on disk; the base of ``QuantizedLinear`` and
``QuantizedEmbedding``. Dequantizing is the torch reference (per call, never a cached dense
copy)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bamba.linear_protocol import LinearWeights
from bamba.quant.formats import (FP8, QuantScheme, dequantize, k_table_values, k_table_width,
                                 kernel_scales, pack_ints, packed_width, quantized_values,
                                 scale_shape, zero_point_shape)


class QuantizedWeights(nn.Module):
    """A weight [rows, cols] held in ``scheme``'s tensors (``weight`` + ``weight_scale`` for
    fp8, ``weight_packed`` + ``weight_shape`` + ``weight_scale`` for ints, + ``weight_zero_point``
    for asymmetric ones; with offsets ``weight_table`` float32 [rows, 2, groups] of scales and
    offsets in place of ``weight_scale``, with two-level scales a K table, uint8 [rows, 2,
    width], or [rows, 1, width] without offsets; with ``levels`` the nibbles as bytes, uint8
    [rows, cols / 2], with ``held_bits`` b uint8 [rows, b cols / 8]); zeros until loaded, one
    scale [1] when ``per_tensor``."""

    def __init__(self, rows: int, cols: int, scheme: QuantScheme,
                 scale_dtype: torch.dtype = torch.bfloat16, per_tensor: bool = False) -> None:
        super().__init__()
        self.scheme = scheme
        self.dense_shape = (rows, cols)
        if scheme.levels or scheme.held_bits:  # nibbles, or six or five bits, as bytes
            width = cols // 2 if scheme.levels else cols // 8 * scheme.held_bits
            self.register_buffer("weight_packed", torch.zeros(rows, width, dtype=torch.uint8))
            self.register_buffer("weight_shape", torch.tensor([rows, cols], dtype=torch.int64))
        elif scheme.packed:
            self.register_buffer("weight_packed",
                                 torch.zeros(rows, packed_width(cols, scheme.bits),
                                             dtype=torch.int32))
            self.register_buffer("weight_shape", torch.tensor([rows, cols], dtype=torch.int64))
        else:
            self.register_buffer("weight", torch.zeros(rows, cols, dtype=FP8))
        if scheme.two_level:  # a K table (formats.k_table)
            self.register_buffer("weight_table", torch.zeros(
                rows, 2 if scheme.offsets else 1, k_table_width(cols, scheme.group_size),
                dtype=torch.uint8))
        elif scheme.offsets:
            self.register_buffer("weight_table", torch.zeros(
                rows, 2, scale_shape(scheme, rows, cols)[1], dtype=torch.float32))
        else:
            self.register_buffer("weight_scale", torch.ones(
                (1,) if per_tensor else scale_shape(scheme, rows, cols), dtype=scale_dtype))
        if scheme.zero_points:
            self.register_buffer("weight_zero_point",
                                 torch.zeros(zero_point_shape(scheme, rows, cols),
                                             dtype=torch.int32))
        self._kernel_scales: tuple[tuple[int, ...], torch.Tensor] | None = None

    @staticmethod
    def stored_shape(tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> tuple[int, int]:
        """(rows, cols) of the dense weight the scheme's ``tensors`` hold."""
        if scheme.packed:
            rows, cols = (int(v) for v in tensors["weight_shape"])
            return rows, cols
        rows, cols = tensors["weight"].shape
        return rows, cols

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Hold ``tensors`` as they are (checked by the caller)."""
        for name in self.scheme.tensor_names():
            setattr(self, name, tensors[name])

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.scheme.tensor_names()}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a compressed-tensors checkpoint holds for it (``saved_scheme``'s):
        ``quantized_tensors()``, but a K table without offsets (Q6_K's) as the float32
        ``weight_scale`` d * sc it stands for, and IQ4's levels and 6-bit values as int8
        values (both exact), which compressed-tensors can describe."""
        tensors = self.quantized_tensors()
        if self.scheme.levels or self.scheme.held_bits:
            values = quantized_values(tensors, self.scheme).to(torch.int8)
            tensors["weight_packed"] = pack_ints(values, 8)
        if self.scheme.two_level and not self.scheme.offsets:
            table = tensors.pop("weight_table")
            tensors["weight_scale"] = k_table_values(table, self.dense_shape[1], self.scheme)[0]
        return tensors

    def kernel_weights(self) -> LinearWeights:
        """The format and tensors the kernels read (``bamba.linear_protocol``); an asymmetric
        weight's scales and offsets as one float32 table: ``weight_table`` itself, or for zero
        points one made by ``formats.kernel_scales`` once and again only after its scales or
        zero points change."""
        data = self.weight_packed if self.scheme.packed else self.weight
        if self.scheme.levels:
            return LinearWeights("iq4", data, None, self.weight_table if self.scheme.two_level
                                 else self.weight_scale)
        name = f"int{self.scheme.held_bits}" if self.scheme.held_bits else self.scheme.name
        if self.scheme.offsets or self.scheme.two_level:  # weight_table: float32, or a K table
            return LinearWeights(name, data, None, self.weight_table)
        if self.scheme.symmetric:
            return LinearWeights(name, data, None, self.weight_scale)
        return LinearWeights(self.scheme.name, data, None, self._zero_point_table())

    def _zero_point_table(self) -> torch.Tensor:
        held = (self.weight_scale, self.weight_zero_point)
        key = tuple(v for t in held for v in (t.data_ptr(), t._version, t.device.index or 0))
        if self._kernel_scales is None or self._kernel_scales[0] != key:
            table = kernel_scales(self.quantized_tensors(), self.scheme)
            self.__dict__["_kernel_scales"] = (key, table)  # not a buffer: derived, not saved
        return self._kernel_scales[1]

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """A fresh dense [rows, cols] weight in ``dtype`` (the reference path and tests)."""
        return dequantize(self.quantized_tensors(), self.scheme, dtype)

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

    def _scheme_repr(self) -> str:
        group = "channel" if self.scheme.group_size is None else f"group {self.scheme.group_size}"
        extras = (", two-level" if self.scheme.two_level else "") + \
            (", IQ4 levels" if self.scheme.levels else "") + \
            (f", held in {self.scheme.held_bits} bits" if self.scheme.held_bits else "") + \
            (", offsets" if self.scheme.offsets else ", zero points" if self.scheme.zero_points
             else "")
        return f"scheme={self.scheme.name} ({group}{extras})"
