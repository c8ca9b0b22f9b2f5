"""Read a checkpoint's headers and plan every output shard before any byte is written.

Everything that can be wrong with the input (missing shards, missing or misshapen
scales, unknown dtypes, duplicate tensors) is found here, so a bad checkpoint fails
before the converter creates anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease._safetensors import DTYPE_SIZES, SafetensorsHeader, read_header
from flagrelease.convert.registry import TargetFormat
from flagrelease.errors import ConvertError

__all__ = [
    "DEFAULT_IGNORE",
    "INDEX_NAME",
    "CheckpointPlan",
    "Job",
    "OutTensor",
    "ShardPlan",
    "SrcTensor",
    "build_plan",
    "ignore_matches",
    "source_files",
]

INDEX_NAME = "model.safetensors.index.json"

#: Modules never quantized: the output head, embeddings, norms and MoE router gates
#: (``mlp.gate`` matches ``...mlp.gate`` but not ``...mlp.gate_proj``).
DEFAULT_IGNORE: tuple[str, ...] = ("lm_head", "embed_tokens", "norm", "mlp.gate")

_FLOAT_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}
_UNSUPPORTED = {"F8_E5M2", "F8_E8M0", "F4"}
_SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class SrcTensor:
    """A tensor of the source checkpoint: where its bytes lie."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute file offset of its first byte
    nbytes: int

    @property
    def rows(self) -> int:
        """First dimension (2-D tensors)."""
        return self.shape[0]

    @property
    def cols(self) -> int:
        """Second dimension (2-D tensors)."""
        return self.shape[1]


@dataclass
class OutTensor:
    """A tensor of an output shard and its byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int = 0

    @property
    def nbytes(self) -> int:
        """Size of its data."""
        return int(math.prod(self.shape) * DTYPE_SIZES[self.dtype])

    @property
    def end(self) -> int:
        """End of its byte range in the data section."""
        return self.start + self.nbytes


@dataclass
class Job:
    """What happens to one source tensor.

    Attributes:
        kind: ``copy`` (bytes as they are), ``dequant`` (block FP8 to BF16) or ``quant``
            (to INT, from a float or a block-FP8 source).
        src: the source tensor.
        scale: its block-FP8 scale, for FP8 sources.
        outputs: role (``weight``, ``weight_scale``, ``weight_packed``, ``weight_shape``) -> output name.
        module: the module name (the tensor name without ``.weight``).
        dense_dtype: dtype of the dense float weight (the FP8 dequantization target, or the source's).
    """

    kind: str
    src: SrcTensor
    scale: SrcTensor | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    module: str = ""
    dense_dtype: str = ""


@dataclass
class ShardPlan:
    """One output shard: its header, size and the jobs that fill it."""

    name: str
    jobs: list[Job]
    tensors: dict[str, OutTensor]
    header: bytes = b""

    @property
    def data_size(self) -> int:
        """Bytes of tensor data."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def size(self) -> int:
        """File size."""
        return len(self.header) + self.data_size

    @property
    def data_offset(self) -> int:
        """File offset of the data section."""
        return len(self.header)

    @property
    def src_bytes(self) -> int:
        """Source bytes its jobs read (weights and scales)."""
        return sum(j.src.nbytes + (j.scale.nbytes if j.scale else 0) for j in self.jobs)


@dataclass
class CheckpointPlan:
    """The whole conversion, decided from headers only."""

    src: Path
    fmt: TargetFormat
    group_size: int
    ignore: tuple[str, ...]
    block: tuple[int, int]
    shards: list[ShardPlan]
    config: dict[str, Any] | None
    weight_files: list[Path]
    ignored_modules: list[str]
    notes: list[str]
    fp8_tensors: int

    @property
    def total_size(self) -> int:
        """Tensor bytes of the output (``metadata.total_size`` of the index)."""
        return sum(s.data_size for s in self.shards)

    @property
    def src_bytes(self) -> int:
        """Tensor bytes of the source."""
        return sum(s.src_bytes for s in self.shards)

    def digest(self) -> str:
        """A hash of everything the output depends on, for resuming."""
        h = hashlib.sha256()
        h.update(json.dumps([self.fmt.name, self.group_size, list(self.ignore), list(self.block)]).encode())
        for f in self.weight_files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        for s in self.shards:
            h.update(s.name.encode())
            h.update(hashlib.sha256(s.header).digest())
        return h.hexdigest()


def ignore_matches(module: str, patterns: Sequence[str]) -> bool:
    """Whether ``module`` matches one of the ignore ``patterns``.

    A pattern ``re:REGEX`` is searched in the module name. Otherwise the pattern's
    dot-separated parts must match a run of the module's parts: the first by suffix,
    the rest exactly. So ``norm`` matches ``model.layers.0.input_layernorm``,
    ``mlp.gate`` matches ``model.layers.3.mlp.gate`` but not ``...mlp.gate_proj``.
    """
    parts = module.split(".")
    for pat in patterns:
        if pat.startswith("re:"):
            if re.search(pat[3:], module):
                return True
            continue
        want = pat.strip(".").split(".")
        n = len(want)
        for i in range(len(parts) - n + 1):
            if parts[i].endswith(want[0]) and parts[i + 1 : i + n] == want[1:]:
                return True
    return False


def _fail(msg: str) -> ConvertError:
    return ConvertError(msg)


def source_files(src: Path) -> list[Path]:
    """Every visible file of the checkpoint folder ``src``, sorted; links inside ``src`` are allowed.

    Hidden files and folders are left out.  The folder is walked without following links
    to folders.

    Raises:
        ConvertError: a symbolic link points outside ``src``, to nothing, or in a loop; a
            folder cannot be read.
    """
    root = Path(src).resolve()
    found: list[Path] = []

    def refuse(path: Path, why: str) -> ConvertError:
        return _fail(
            f"{path} {why}; the checkpoint folder must hold its own files: copy it into a plain folder "
            f"(cp -rL SRC NEW) and convert that"
        )

    def walk_error(err: OSError) -> None:
        raise refuse(Path(err.filename or root), f"cannot be read ({err.strerror or err})") from err

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=walk_error):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in [*dirnames, *sorted(filenames)]:
            full = here / name
            if name.startswith(".") or not full.is_symlink():
                if name in filenames and not name.startswith("."):
                    found.append(full)
                continue
            try:
                real = full.resolve(strict=True)
            except RuntimeError as err:  # Python < 3.13 reports a link loop this way
                raise refuse(full, "is a symbolic link loop") from err
            except OSError as err:
                raise refuse(
                    full, "is a symbolic link loop" if err.errno == errno.ELOOP else "points to nothing"
                ) from err
            if not real.is_relative_to(root):
                raise refuse(full, f"links to {real}, outside {root}")
            if name in filenames and real.is_file():
                found.append(full)
    return sorted(found)


def _weight_files(src: Path, listing: list[Path]) -> tuple[list[Path], dict[str, str] | None]:
    top = {p.name: p for p in listing if p.parent == src}
    index = src / INDEX_NAME
    if INDEX_NAME in top:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
            raise _fail(f"{index}: not a valid safetensors index ({err}); re-fetch the checkpoint") from err
        odd = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v]
        if odd:
            raise _fail(
                f"{index}: weight_map maps {odd[0][0]!r} to {odd[0][1]!r}, not a shard file name "
                f"({len(odd)} such entries); the index is damaged: re-fetch the checkpoint"
            )
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if Path(n).name != n or n in (".", "..")]
        if bad:
            raise _fail(f"{index} names shard files outside the checkpoint folder: {bad[:3]}")
        missing = [n for n in names if n not in top]
        if missing:
            raise _fail(
                f"{index} names {len(missing)} shard(s) missing from {src}: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; re-fetch the checkpoint (flagrelease fetch)"
            )
        return [src / n for n in names], weight_map
    files = sorted(p for name, p in top.items() if name.endswith(".safetensors"))
    if not files:
        raise _fail(f"{src} holds no *.safetensors weights; point convert at a safetensors checkpoint folder")
    return files, None


def _read_headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, SrcTensor]:
    tensors: dict[str, SrcTensor] = {}
    for f in files:
        try:
            header: SafetensorsHeader = read_header(f)
        except (OSError, ValueError) as err:
            raise _fail(f"{f}: cannot read the safetensors header: {err}; re-fetch this shard") from err
        for t in header.tensors.values():
            if t.name in tensors:
                raise _fail(f"tensor {t.name!r} appears in both {tensors[t.name].file.name} and {f.name}")
            tensors[t.name] = SrcTensor(t.name, t.dtype, t.shape, f, header.data_offset + t.start, t.nbytes)
    if weight_map is not None:
        for name, fname in weight_map.items():
            got = tensors.get(name)
            if got is None or got.file.name != fname:
                where = f"it is in {got.file.name}" if got else "no shard holds it"
                raise _fail(f"{INDEX_NAME} puts {name!r} in {fname} but {where}; the checkpoint is inconsistent")
    return tensors


def _block_size(config: dict[str, Any] | None) -> tuple[int, int]:
    qc = (config or {}).get("quantization_config") or {}
    block = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
        return int(block[0]), int(block[1])
    return 128, 128


def _read_config(src: Path) -> dict[str, Any] | None:
    path = src / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise _fail(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise _fail(f"{path} does not hold a JSON object")
    return data


def _check_source_quant(config: dict[str, Any] | None) -> None:
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return
    method = str(qc.get("quant_method", "")).lower()
    if method and method != "fp8":
        raise _fail(
            f"the source checkpoint is already quantized (quant_method {method!r}); "
            "convert from the original BF16 or FP8 weights"
        )


def build_plan(
    src: Path,
    *,
    fmt: TargetFormat,
    ignore: Sequence[str],
    group_size: int,
) -> CheckpointPlan:
    """Plan converting the checkpoint in ``src`` to ``fmt``.

    Raises:
        ConvertError: the checkpoint is incomplete or inconsistent (the message names
            the shard or tensor and says what to do).
    """
    src = Path(src).resolve()
    if not src.is_dir():
        raise _fail(f"{src} is not a folder; give the checkpoint folder (with config.json and *.safetensors)")
    if fmt.strategy == "group" and group_size <= 0:
        raise _fail(f"group_size must be positive, got {group_size}")
    listing = source_files(src)
    config = _read_config(src)
    _check_source_quant(config)
    block = _block_size(config)
    files, weight_map = _weight_files(src, listing)
    tensors = _read_headers(files, weight_map)
    notes: list[str] = []

    scales = {n: t for n, t in tensors.items() if n.endswith(_SCALE_SUFFIX)}
    fp8 = 0
    jobs_by_file: dict[Path, list[Job]] = {f: [] for f in files}
    ignored: set[str] = set()
    for name, t in tensors.items():
        if name in scales:
            weight_name = name[: -len(_SCALE_SUFFIX)]
            if weight_name not in tensors:
                raise _fail(
                    f"scale {name!r} ({t.file.name}) has no weight {weight_name!r}; the checkpoint is incomplete"
                )
            continue
        if t.dtype not in DTYPE_SIZES:
            raise _fail(f"tensor {name!r} in {t.file.name} has unknown dtype {t.dtype!r}")
        if t.dtype in _UNSUPPORTED:
            raise _fail(
                f"tensor {name!r} in {t.file.name} has dtype {t.dtype}, which the converter does not handle; "
                "supported: F8_E4M3 with block scales, BF16, F16, F32 (other dtypes are copied)"
            )
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        scale = scales.get(name + _SCALE_SUFFIX)
        job = Job(kind="copy", src=t, module=module, dense_dtype=t.dtype)
        if t.dtype == "F8_E4M3":
            if fmt.name == "none":
                raise _fail("format 'none' cannot copy FP8 weights into a servable BF16/INT checkpoint")
            if scale is None:
                raise _fail(
                    f"FP8 tensor {name!r} ({t.file.name}) has no scale {name + _SCALE_SUFFIX!r}; "
                    "the checkpoint is incomplete or not DeepSeek block-FP8"
                )
            if len(t.shape) != 2:
                raise _fail(f"FP8 tensor {name!r} has shape {list(t.shape)}; only 2-D block-FP8 weights are supported")
            want = (math.ceil(t.rows / block[0]), math.ceil(t.cols / block[1]))
            if tuple(scale.shape) != want:
                raise _fail(
                    f"scale {scale.name!r} has shape {list(scale.shape)} but weight {name!r} {list(t.shape)} with "
                    f"{block[0]}x{block[1]} blocks needs {list(want)}; the checkpoint is inconsistent"
                )
            if scale.dtype not in _FLOAT_DTYPES:
                raise _fail(f"scale {scale.name!r} has dtype {scale.dtype}; expected F32")
            fp8 += 1
            job.scale = scale
            job.kind = "dequant"
            job.dense_dtype = "BF16"
        elif scale is not None:
            raise _fail(f"tensor {name!r} has a block scale but dtype {t.dtype}, not F8_E4M3")
        quantizable = name.endswith(".weight") and len(t.shape) == 2 and job.dense_dtype in _FLOAT_DTYPES
        if fmt.quantizes and quantizable:
            if ignore_matches(module, ignore):
                ignored.add(module)
            elif fmt.strategy == "group" and t.cols % group_size:
                ignored.add(module)
                notes.append(
                    f"{module}: {t.cols} input columns are not a multiple of group size {group_size}; kept dense"
                )
            else:
                job.kind = "quant"
        jobs_by_file[t.file].append(job)

    shards = [_shard_plan(f.name, jobs, fmt, group_size) for f, jobs in jobs_by_file.items() if jobs]
    if fmt.quantizes and not any(j.kind == "quant" for s in shards for j in s.jobs):
        notes.append("no tensor matched for quantization; every weight was kept dense")
    if fmt.name == "bf16" and not fp8:
        notes.append("the source holds no block-FP8 weights; tensors were copied unchanged")
    if fmt.quantizes and ignore_matches("lm_head", ignore):
        ignored.add("lm_head")
    return CheckpointPlan(
        src=src,
        fmt=fmt,
        group_size=group_size,
        ignore=tuple(ignore),
        block=block,
        shards=shards,
        config=config,
        weight_files=files,
        ignored_modules=sorted(ignored),
        notes=notes,
        fp8_tensors=fp8,
    )


def _shard_plan(name: str, jobs: list[Job], fmt: TargetFormat, group_size: int) -> ShardPlan:
    outs: list[OutTensor] = []
    for job in jobs:
        t = job.src
        if job.kind == "copy":
            job.outputs = {"weight": t.name}
            outs.append(OutTensor(t.name, t.dtype, t.shape))
        elif job.kind == "dequant":
            job.outputs = {"weight": t.name}
            outs.append(OutTensor(t.name, "BF16", t.shape))
        else:
            rows, cols = t.shape
            groups = math.ceil(cols / group_size) if fmt.strategy == "group" else 1
            scale_name = f"{job.module}.weight_scale"
            if fmt.packed:
                assert fmt.num_bits is not None
                per = 32 // fmt.num_bits
                job.outputs = {
                    "weight_packed": f"{job.module}.weight_packed",
                    "weight_scale": scale_name,
                    "weight_shape": f"{job.module}.weight_shape",
                }
                outs.append(OutTensor(job.outputs["weight_packed"], "I32", (rows, math.ceil(cols / per))))
                outs.append(OutTensor(scale_name, job.dense_dtype, (rows, groups)))
                outs.append(OutTensor(job.outputs["weight_shape"], "I64", (2,)))
            else:
                job.outputs = {"weight": t.name, "weight_scale": scale_name}
                outs.append(OutTensor(t.name, "I8", (rows, cols)))
                outs.append(OutTensor(scale_name, job.dense_dtype, (rows, groups)))
    # Widest dtypes first keeps every tensor aligned to its element size (as safetensors does).
    order = sorted(range(len(outs)), key=lambda i: (-DTYPE_SIZES[outs[i].dtype], i))
    tensors: dict[str, OutTensor] = {}
    pos = 0
    for i in order:
        o = outs[i]
        if o.name in tensors:
            raise _fail(f"output tensor {o.name!r} would be written twice; the source names clash")
        o.start = pos
        pos = o.end
        tensors[o.name] = o
    return ShardPlan(name=name, jobs=jobs, tensors=tensors, header=_header_bytes(tensors))


def _header_bytes(tensors: dict[str, OutTensor]) -> bytes:
    obj: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for t in tensors.values():
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw
