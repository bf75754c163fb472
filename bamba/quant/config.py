"""config.json's ``quantization_config`` in the compressed-tensors form: parsed (ours or
llm-compressor's), written (ours), and matched against module names the way compressed-tensors
matches them (a target or ignore entry is a class name such as "Linear", an exact module name,
or "re:<regex>" matched from the start of the name)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bamba.quant.formats import QuantScheme

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
FLOAT_FORMAT = "float-quantized"
PACKED_FORMAT = "pack-quantized"
FORMATS = (FLOAT_FORMAT, PACKED_FORMAT)
MIXED_FORMAT = "mixed-precision"  # each config group names its own format
STATUS_COMPRESSED = "compressed"
LM_HEAD = "lm_head"
# A Granite MoE's experts as per-expert linears (``bamba.quant.experts``), for a group of their own
EXPERT_LINEARS = r"re:.*block_sparse_moe\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"
# (weights type, num_bits) -> our scheme name
_SCHEME_OF = {("float", 8): "fp8", ("int", 8): "int8", ("int", 4): "int4"}


@dataclass(frozen=True)
class QuantGroup:
    """One config group: the modules it targets and their weight format; ``per_tensor`` for
    strategy "tensor" (one scalar scale)."""
    targets: tuple[str, ...]
    scheme: QuantScheme
    per_tensor: bool = False


@dataclass(frozen=True)
class QuantConfig:
    """A parsed ``quantization_config``; ``raw`` is what config.json holds (written back as is);
    ``format`` "mixed-precision" when each group names its own."""
    format: str
    groups: tuple[QuantGroup, ...]
    ignore: tuple[str, ...]
    raw: dict[str, Any]

    def group_for(self, name: str, class_names: Iterable[str]) -> QuantGroup | None:
        """The group quantizing module ``name`` (checkpoint naming) of the given classes, or
        None when no group targets it or ``ignore`` names it. As in compressed-tensors, a
        group naming the module exactly wins over one matching it by regex, and that over one
        targeting its class."""
        classes = tuple(class_names)
        if any(matches(name, classes, entry) for entry in self.ignore):
            return None
        ranked = [(_precedence(target, name), index) for index, group in enumerate(self.groups)
                  for target in group.targets if matches(name, classes, target)]
        return self.groups[min(ranked)[1]] if ranked else None


def _precedence(target: str, name: str) -> int:
    """0 for an exact name, 1 for a regex, 2 for a class name (compressed-tensors' order)."""
    return 0 if target == name else 1 if target.startswith("re:") else 2


def matches(name: str, class_names: tuple[str, ...], target: str) -> bool:
    """compressed-tensors' rule: "re:" regex (re.match), else the exact name or a class name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in class_names


def _check_regexes(where: str, entries: Iterable[str]) -> None:
    """ValueError naming the first "re:" entry that is not a regular expression."""
    for entry in entries:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as err:
                raise ValueError(f"{where}: {entry!r} is not a regular expression ({err})") \
                    from None


def weights_dict(scheme: QuantScheme) -> dict[str, Any]:
    """A config group's ``weights`` entry for our scheme, as llm-compressor writes it."""
    return {"num_bits": scheme.bits, "type": "float" if scheme.name == "fp8" else "int",
            "symmetric": scheme.symmetric, "group_size": scheme.group_size,
            "strategy": "channel" if scheme.group_size is None else "group",
            "dynamic": False, "observer": "minmax"}


def quantization_config_dict(scheme: QuantScheme, ignore: Iterable[str],
                             lm_head: QuantScheme | None = None,
                             embedding: QuantScheme | None = None,
                             experts: QuantScheme | None = None) -> dict[str, Any]:
    """The ``quantization_config`` ``bamba quantize`` writes: weight-only (activations stay in
    the model's dtype, ``input_activations: null``), every Linear but ``ignore`` in
    ``scheme``; with ``lm_head``, ``embedding`` or ``experts``, a group of its own for the LM
    head (by name), the token embeddings (class ``Embedding``) or a Granite MoE's experts (by
    regex over their per-expert linears)."""
    groups = [(["Linear"], scheme)]
    if lm_head is not None:
        groups.append(([LM_HEAD], lm_head))
    if embedding is not None:
        groups.append((["Embedding"], embedding))
    if experts is not None:
        groups.append(([EXPERT_LINEARS], experts))
    return quantization_config_of(groups, ignore)


def quantization_config_of(groups: Iterable[tuple[Iterable[str], QuantScheme]],
                           ignore: Iterable[str] = ()) -> dict[str, Any]:
    """A weight-only ``quantization_config`` of config groups, each (targets, scheme): targets
    are class names, exact checkpoint names or ``re:`` regexes. Groups of different formats
    make a "mixed-precision" config, each group naming its format. A scheme with float offsets
    (a GGUF file's blocks) is recorded with ``"offsets": true`` in its weights, which
    compressed-tensors has no layout for (such a model is not saved as a checkpoint)."""
    groups = [(list(targets), s) for targets, s in groups]
    formats = {_format_of(s) for _, s in groups}
    mixed = len(formats) > 1
    return {
        "config_groups": {
            f"group_{i}": {"targets": targets,
                           "weights": {**weights_dict(s),
                                       **({"offsets": True} if s.offsets else {})},
                           "input_activations": None, "output_activations": None,
                           "format": _format_of(s) if mixed else None}
            for i, (targets, s) in enumerate(groups)},
        "quant_method": QUANT_METHOD,
        "kv_cache_scheme": None,
        "format": MIXED_FORMAT if mixed else formats.pop() if formats else PACKED_FORMAT,
        "quantization_status": STATUS_COMPRESSED,
        "global_compression_ratio": None,
        "ignore": list(ignore),
    }


def _format_of(scheme: QuantScheme) -> str:
    return PACKED_FORMAT if scheme.packed else FLOAT_FORMAT


def parse_quantization_config(raw: Any) -> QuantConfig:
    """The checked config (ValueError naming the first unsupported or malformed field)."""
    if not isinstance(raw, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {raw!r}")
    if raw.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"quantization_config quant_method {raw.get('quant_method')!r} is not "
                         f"supported (expected {QUANT_METHOD!r})")
    fmt = raw.get("format")
    if fmt not in (*FORMATS, MIXED_FORMAT):
        raise ValueError(f"quantization_config format {fmt!r} is not supported (expected one "
                         f"of {', '.join((*FORMATS, MIXED_FORMAT))})")
    status = raw.get("quantization_status", STATUS_COMPRESSED)
    if status != STATUS_COMPRESSED:
        raise ValueError(f"quantization_config quantization_status {status!r} is not supported "
                         f"(expected {STATUS_COMPRESSED!r})")
    if raw.get("kv_cache_scheme") is not None:
        raise ValueError("quantization_config kv_cache_scheme is not supported (expected null)")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("quantization_config config_groups must be a non-empty object")
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ValueError(f"quantization_config ignore must be a list of names, got {ignore!r}")
    _check_regexes("quantization_config ignore", ignore)
    parsed = tuple(_parse_group(name, group, fmt) for name, group in groups.items())
    return QuantConfig(fmt, parsed, tuple(ignore), raw)


def _parse_group(name: str, group: Any, fmt: str) -> QuantGroup:
    where = f"quantization_config config_groups.{name}"
    if not isinstance(group, dict):
        raise ValueError(f"{where} must be an object")
    fmt = group.get("format") or fmt
    if fmt not in FORMATS:
        raise ValueError(f"{where}.format {fmt!r} is not supported (expected one of "
                         f"{', '.join(FORMATS)})")
    targets = group.get("targets")
    if not isinstance(targets, list) or not targets or \
            not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}.targets must be a non-empty list of names")
    _check_regexes(f"{where}.targets", targets)
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"{where}.weights must be an object (activation-only schemes are not "
                         f"supported)")
    kind = (weights.get("type"), weights.get("num_bits"))
    scheme_name = next((name for known, name in _SCHEME_OF.items() if known == kind), None)
    if scheme_name is None:
        raise ValueError(f"{where}.weights: type {kind[0]!r} with num_bits {kind[1]!r} is not "
                         f"supported (float 8, int 8, int 4)")
    if (scheme_name == "fp8") != (fmt == FLOAT_FORMAT):
        raise ValueError(f"{where}.weights: {kind[0]} {kind[1]}-bit weights do not fit "
                         f"format {fmt!r}")
    if weights.get("offsets"):
        raise ValueError(f"{where}.weights: float offsets (GGUF blocks) have no "
                         f"compressed-tensors layout")
    symmetric = weights.get("symmetric")
    if not isinstance(symmetric, bool) or (not symmetric and scheme_name == "fp8"):
        raise ValueError(f"{where}.weights: symmetric {symmetric!r} is not supported (true, "
                         f"or false for int weights)")
    if weights.get("dynamic") not in (False, None):
        raise ValueError(f"{where}.weights: dynamic weight quantization is not supported")
    # GPTQ's "weight" ordering ("static", llm-compressor's default) only changes how it
    # calibrated: the stored format is a plain group one. "group" ("dynamic") stores g_idx.
    if weights.get("actorder") not in (None, False, "weight", "static"):
        raise ValueError(f"{where}.weights: activation ordering {weights.get('actorder')!r} "
                         f"(g_idx) is not supported (none, \"weight\" or \"static\")")
    strategy = weights.get("strategy")
    group_size = weights.get("group_size")
    if strategy == "group":
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise ValueError(f"{where}.weights: strategy group needs a positive group_size, "
                             f"got {group_size!r}")
        scheme = QuantScheme(scheme_name, group_size, symmetric)
    elif strategy == "channel" or (strategy == "tensor" and scheme_name == "fp8"):
        scheme = QuantScheme(scheme_name, None, symmetric)
    else:
        raise ValueError(f"{where}.weights: strategy {strategy!r} is not supported for "
                         f"{scheme_name} (channel, group{', tensor' * (scheme_name == 'fp8')})")
    _note_activations(where, group)
    return QuantGroup(tuple(targets), scheme, per_tensor=strategy == "tensor")


def _note_activations(where: str, group: dict[str, Any]) -> None:
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            log.info("%s.%s: activations quantized by the scheme run in the model's dtype here "
                     "(weights stay quantized)", where, key)
