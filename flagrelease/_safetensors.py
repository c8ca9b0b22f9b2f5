"""Read and check safetensors headers without loading tensors."""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DTYPE_SIZES", "MAX_ELEMENTS", "SafetensorsHeader", "TensorInfo", "read_header"]

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "F4": 0.5,
}
_MAX_HEADER = 100 << 20
#: No tensor has more elements than this (2**53, what a float counts exactly).
MAX_ELEMENTS = 1 << 53


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset in the data section
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data."""
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed and checked safetensors header."""

    path: Path
    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def data_offset(self) -> int:
        """File offset where tensor data begins."""
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        """Bytes of tensor data the header accounts for."""
        return max((t.end for t in self.tensors.values()), default=0)


def read_header(path: Path, *, check: bool = True) -> SafetensorsHeader:
    """Parse the header of ``path`` and, with ``check``, verify it against the file.

    Checks: the header length fits the file, every dtype is known, every tensor's byte
    range matches its shape and dtype, ranges do not overlap, and the data section ends
    exactly where the file ends.

    Raises:
        ValueError: the file is truncated or its header is inconsistent (the message
            names the file and the tensor).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path.name}: header length {n} does not fit the file's {size} bytes")
        raw = fh.read(n)
    try:
        obj: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path.name}: header is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name}: header is a JSON {type(obj).__name__}, not an object of tensor entries")
    meta = obj.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path.name}: __metadata__ is not an object of strings ({_short(meta)})")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        tensors[name] = _entry(path.name, name, entry)
    header = SafetensorsHeader(path, n, tensors, dict(meta))
    if check:
        _check(header, size)
    return header


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(file: str, name: str, entry: object) -> TensorInfo:
    """One tensor entry, checked for shape: a known dtype, whole non-negative dims and offsets."""
    if not isinstance(entry, dict):
        raise ValueError(f"{file}: tensor {name!r} has a malformed header entry ({_short(entry)})")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise ValueError(f"{file}: tensor {name!r} has dtype {_short(dtype)}, not a dtype name")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise ValueError(f"{file}: tensor {name!r} has shape {_short(shape)}, not a list of whole numbers")
    if any(d < 0 for d in shape):
        raise ValueError(f"{file}: tensor {name!r} has a negative dimension in its shape {shape}")
    count = 1
    for d in shape:
        count *= d
    if any(d > MAX_ELEMENTS for d in shape) or count > MAX_ELEMENTS:
        raise ValueError(f"{file}: tensor {name!r} has shape {shape}, more than {MAX_ELEMENTS} elements")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
        raise ValueError(f"{file}: tensor {name!r} has data_offsets {_short(offsets)}, not [start, end] numbers")
    start, end = offsets
    if not 0 <= start <= end:
        raise ValueError(f"{file}: tensor {name!r} has data_offsets [{start}, {end}], not 0 <= start <= end")
    return TensorInfo(name, dtype, tuple(shape), start, end)


def _check(header: SafetensorsHeader, size: int) -> None:
    name = header.path.name
    spans = []
    for t in header.tensors.values():
        if t.dtype not in DTYPE_SIZES:
            raise ValueError(f"{name}: tensor {t.name!r} has unknown dtype {t.dtype!r}")
        count = 1
        for d in t.shape:
            count *= d
        want = int(count * DTYPE_SIZES[t.dtype])
        if t.end - t.start != want or t.start < 0:
            raise ValueError(
                f"{name}: tensor {t.name!r} spans {t.end - t.start} bytes but {t.dtype}{list(t.shape)} needs {want}"
            )
        spans.append((t.start, t.end, t.name))
    spans.sort()
    for (_s0, e0, n0), (s1, _e1, n1) in itertools.pairwise(spans):
        if s1 < e0:
            raise ValueError(f"{name}: tensors {n0!r} and {n1!r} overlap")
    data = size - header.data_offset
    if header.data_size != data:
        raise ValueError(
            f"{name}: header accounts for {header.data_size} data bytes but the file holds {data}"
            + (" (truncated)" if data < header.data_size else "")
        )
