"""``QuantizedExpertWeights``: a mixture's stacked expert weights [experts, rows, cols] held
quantized as one [experts * rows, cols] weight (``QuantizedWeights``), each expert's rows
contiguous, so a kernel streams one expert's slice alone.

On disk (compressed-tensors has no layout for a stacked weight) each expert is a set of
linears of its own, as llm-compressor writes transformers' stacked experts and vLLM's Granite
loader reads them: ``<moe>.experts.<e>.gate_proj`` and ``up_proj`` (the two row halves of
expert e's ``input_linear``) and ``down_proj`` (its ``output_linear``), each with the scheme's
tensors. llm-compressor's earlier Granite 4 recipe stored the fp8 stack whole instead
(``<moe>.input_linear.weight`` [E, 2F, H] and ``weight_scale`` [E, 2F, 1]); that reads too.
GGUF files bring them as llama.cpp's ``ffn_*_exps`` blocks (Q8_0 / Q4_0)."""

from __future__ import annotations

import re

import torch

from bamba.linear_protocol import LinearWeights
from bamba.quant.formats import QuantScheme, dequantize, quantize
from bamba.quant.weights import QuantizedWeights

# A stacked module's name (its last part) -> the per-expert linears its rows split into.
PROJECTIONS = {"input_linear": ("gate_proj", "up_proj"), "output_linear": ("down_proj",)}
# The classes a stacked module matches as in a quantization_config: llm-compressor's Granite 4
# recipe swapped each for a Linear subclass of this name before quantizing.
STACKED_CLASSES = ("GraniteMoeHybridParallelExpertsLinear", "Linear")
_PIECE = re.compile(r"(?P<moe>.+\.block_sparse_moe)\.experts\.(?P<expert>\d+)\."
                    r"(?P<proj>gate_proj|up_proj|down_proj)\.(?P<leaf>\w+)$")


def piece_modules(stacked: str, experts: int) -> list[str]:
    """The per-expert linears holding the rows of the stacked module ``stacked`` (checkpoint
    names, ``<moe>.input_linear`` or ``<moe>.output_linear``), in row order."""
    moe, _, kind = stacked.rpartition(".")
    return [f"{moe}.experts.{e}.{proj}" for e in range(experts) for proj in PROJECTIONS[kind]]


def piece_target(stacked: str) -> str:
    """A quantization_config target ("re:" regex) for the per-expert linears of the stacked
    module ``stacked`` (checkpoint name) alone."""
    moe, _, kind = stacked.rpartition(".")
    return f"re:{re.escape(moe)}\\.experts\\.\\d+\\.({'|'.join(PROJECTIONS[kind])})$"


def locate_piece(name: str) -> tuple[str, int, int] | None:
    """A per-expert tensor's checkpoint name -> (the stacked tensor it is rows of, its index
    in row order, pieces an expert has); None for any other name."""
    match = _PIECE.match(name)
    if match is None:
        return None
    kind = "output_linear" if match["proj"] == "down_proj" else "input_linear"
    projections = PROJECTIONS[kind]
    index = int(match["expert"]) * len(projections) + projections.index(match["proj"])
    return f"{match['moe']}.{kind}.{match['leaf']}", index, len(projections)


def split_into_pieces(stacked: str, tensors: dict[str, torch.Tensor],
                      experts: int) -> dict[str, torch.Tensor]:
    """A stacked module's quantized tensors (leaf -> [E * rows, ...]) as its per-expert
    linears' tensors, checkpoint-named."""
    modules = piece_modules(stacked, experts)
    out: dict[str, torch.Tensor] = {}
    for leaf, tensor in tensors.items():
        if leaf == "weight_shape":
            rows, cols = (int(v) for v in tensor)
            parts = [torch.tensor([rows // len(modules), cols], dtype=tensor.dtype)
                     for _ in modules]
        else:
            parts = tensor.chunk(len(modules))
        out.update({f"{module}.{leaf}": part.contiguous() for module, part in zip(modules, parts)})
    return out


def quantize_stacked(stacked: str, weight: torch.Tensor,
                     scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """A dense stacked weight [E, rows, cols] quantized row by row, as per-expert tensors."""
    return split_into_pieces(stacked, quantize(weight.reshape(-1, weight.shape[-1]), scheme),
                             weight.shape[0])


class QuantizedExpertWeights(QuantizedWeights):
    def __init__(self, experts: int, out_features: int, in_features: int, scheme: QuantScheme,
                 scale_dtype: torch.dtype = torch.float16) -> None:
        super().__init__(experts * out_features, in_features, scheme, scale_dtype)
        self.experts, self.out_features, self.in_features = experts, out_features, in_features

    @classmethod
    def from_stacked(cls, weight: torch.Tensor, scheme: QuantScheme) -> QuantizedExpertWeights:
        """A dense [E, out, in] weight quantized (each expert's rows as a linear's are)."""
        experts, n, k = weight.shape
        tensors = quantize(weight.detach().reshape(experts * n, k), scheme)
        layer = cls(experts, n, k, scheme, tensors["weight_scale"].dtype)
        layer.load_tensors(tensors)
        return layer

    def stacked(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense [experts, out, in] weights in ``dtype``."""
        return self.dequantized_weight(dtype).view(self.experts, self.out_features,
                                                   self.in_features)

    def checkpoint_tensors(self, stacked: str) -> dict[str, torch.Tensor]:
        """Its tensors as the per-expert linears a checkpoint holds, ``stacked`` being its own
        checkpoint name."""
        return split_into_pieces(stacked, self.saved_tensors(), self.experts)

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


class ExpertPieces:
    """A checkpoint's per-expert pieces gathered into a model's stacked tensors while loading:
    each piece's rows in their place, each piece's ``weight_shape`` checked."""

    def __init__(self, model: torch.nn.Module, where: object):
        self.model, self.where = model, where
        self.pending: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}

    def join(self, key: str, ours: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """``tensor`` itself when ``key`` (a checkpoint name) is no piece; else our whole
        tensor ``ours`` once its last piece arrives, None before. ValueError naming a piece
        whose ``weight_shape`` does not fit."""
        piece = locate_piece(key)
        if piece is None:
            return tensor
        stacked = self.model.get_submodule(ours.rpartition(".")[0])
        count = stacked.experts * piece[2]
        parts = self.pending.setdefault(ours, {})
        parts[piece[1]] = (key, tensor)
        if len(parts) < count:
            return None
        del self.pending[ours]
        ordered = [parts[i] for i in range(count)]
        if not ours.endswith(".weight_shape"):
            return torch.cat([t for _, t in ordered])
        rows, cols = stacked.dense_shape
        for name, held in ordered:
            if held.tolist() != [rows // count, cols]:
                raise ValueError(f"{self.where}: tensor {name} holds {held.tolist()}, expected "
                                 f"{[rows // count, cols]}")
        return torch.tensor([rows, cols], dtype=torch.int64)
