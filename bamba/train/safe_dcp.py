"""Reading DCP checkpoints without running code from them.

torch.distributed.checkpoint's ``FileSystemReader`` reads ``.metadata`` with ``pickle.load``
and its default planner reads non-tensor entries (the optimizer's hyperparameters) with
``torch.load(weights_only=False)``: a crafted checkpoint directory would run code on resume.
``SafeReader`` unpickles the metadata with an allow-list of DCP's own metadata classes (plus
``torch.Size``, dtypes, layouts and ``pathlib`` paths, which they hold) and checks that every
entry points into a data file of the checkpoint directory; ``SafeLoadPlanner`` reads the
non-tensor entries with ``torch.load(weights_only=True)``. Both raise ``ValueError``.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint._traverse import set_element

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS = frozenset({
    (_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # returns one of torch's layout objects by name
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
})
DATA_FILE = re.compile(r"__\d+_\d+\.distcp")  # what FileSystemWriter names its files


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path: Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` file with the allow-list; ValueError if it is anything else."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            KeyError, IndexError) as exc:
        raise ValueError(f"{path}: not valid checkpoint metadata ({exc})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise ValueError(f"{path}: not valid checkpoint metadata (a {type(metadata).__name__})")
    return metadata


def check_storage(directory: Path, metadata: Metadata) -> None:
    """Every entry must name a data file of ``directory`` and a byte range inside it."""
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if not isinstance(info, _StorageInfo) or info.transform_descriptors:
            raise ValueError(f"{directory}: checkpoint entry {index} is not a plain byte range")
        name = info.relative_path
        if not isinstance(name, str) or not DATA_FILE.fullmatch(name):
            raise ValueError(f"{directory}: checkpoint entry names {name!r}, not a data file "
                             "of the checkpoint directory")
        if name not in sizes:
            file = directory / name
            if not file.is_file():
                raise ValueError(f"{directory}: checkpoint data file {name} is missing")
            sizes[name] = file.stat().st_size
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0
                and length >= 0 and offset + length <= sizes[name]):
            raise ValueError(f"{directory}: checkpoint entry {index} lies outside {name} "
                             f"({sizes[name]} bytes)")


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by ``read_metadata`` and checked."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        directory = Path(os.fspath(self.path))
        metadata = read_metadata(Path(os.fspath(self._get_metadata_path(kwargs.get("rank")))))
        check_storage(directory, metadata)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            why = [line for line in str(exc).splitlines() if "unsupported" in line.lower()]
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn} is not plain data"
                             + (f" ({why[0].strip()})" if why else "")) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
