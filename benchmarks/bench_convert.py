"""Benchmark the streaming converter against a plain copy (the disk roofline) and a naive converter.

One run generates a synthetic DeepSeek-style block-FP8 checkpoint (``--size-gb``, default 8,
in shards of ``--shard-gb``) in a temporary folder under ``--dir``, then measures, each in
its own subprocess so that its peak RSS (``ru_maxrss``) is its own:

- ``copy fp8``: ``shutil.copyfile`` of the FP8 shards (+ fsync): the disk roofline.
- ``stream fp8->bf16``: :func:`flagrelease.convert.convert_checkpoint` to ``bf16``.
- ``naive fp8->bf16``: per shard ``safetensors.torch.load_file``, dequantize, ``save_file``.
- ``copy bf16``: copy of the BF16 shards, the roofline of the next step.
- ``stream bf16->int8``: the BF16 output to ``int8-w8a8``.
- ``naive bf16->int8``: per shard load, quantize per channel, save.

Peak RSS is the child's ``VmHWM`` (``ru_maxrss`` carries the parent's peak across ``exec``).

The page cache is dropped before each measurement (``sync; echo 3 > /proc/sys/vm/drop_caches``)
when the process may write that file; otherwise the report says so.  Everything is removed
at the end unless ``--keep``.

Usage::

    python benchmarks/bench_convert.py --size-gb 8 --dir /tmp [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["generate_fp8_checkpoint", "main"]

HIDDEN = 4096
INTER = 11008
VOCAB = 32000
BLOCK = 128


def _header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> tuple[bytes, list[int]]:
    obj: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    sizes = []
    for name, dtype, shape, nbytes in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
        sizes.append(nbytes)
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, sizes


def generate_fp8_checkpoint(dest: Path, *, size_gb: float, shard_gb: float = 1.0, seed: int = 0) -> int:
    """Write a DeepSeek-style block-FP8 checkpoint of about ``size_gb`` into ``dest``.

    Layers of FP8 ``gate_proj``/``up_proj``/``down_proj`` ``[11008, 4096]``-sized weights with
    F32 ``weight_scale_inv`` blocks, BF16 norms and router gates, BF16 embeddings and
    ``lm_head``. Weight bytes are random (no NaN codes), drawn from one 64 MiB pool.

    Returns:
        Bytes of tensor data written.
    """
    import torch

    dest.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=gen)
    pool[(pool & 0x7F) == 0x7F] = 0x3F  # no NaN codes
    pool_b = pool.numpy().tobytes()
    target = int(size_gb * 1e9)
    shard_bytes = int(shard_gb * 1e9)

    def tensors() -> Any:
        emb = VOCAB * HIDDEN * 2
        yield "model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN), emb
        total = emb * 2
        layer = 0
        while total < target:
            p = f"model.layers.{layer}"
            yield f"{p}.input_layernorm.weight", "BF16", (HIDDEN,), HIDDEN * 2
            yield f"{p}.mlp.gate.weight", "BF16", (64, HIDDEN), 64 * HIDDEN * 2
            for proj, shape in (
                ("gate_proj", (INTER, HIDDEN)),
                ("up_proj", (INTER, HIDDEN)),
                ("down_proj", (HIDDEN, INTER)),
            ):
                n = shape[0] * shape[1]
                sshape = (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
                yield f"{p}.mlp.{proj}.weight", "F8_E4M3", shape, n
                yield f"{p}.mlp.{proj}.weight_scale_inv", "F32", sshape, sshape[0] * sshape[1] * 4
                total += n
            layer += 1
        yield "model.norm.weight", "BF16", (HIDDEN,), HIDDEN * 2
        yield "lm_head.weight", "BF16", (VOCAB, HIDDEN), emb

    shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
    size = 0
    for entry in tensors():
        if size + entry[3] > shard_bytes and shards[-1] and not entry[0].endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]
    weight_map: dict[str, str] = {}
    total = 0
    scale_gen = torch.Generator().manual_seed(seed + 1)
    for i, entries in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, _ = _header(entries)
        with open(dest / name, "wb") as fh:
            fh.write(header)
            for tname, dtype, shape, nbytes in entries:
                weight_map[tname] = name
                if dtype == "F32":
                    fh.write((torch.rand(shape, generator=scale_gen) * 1e-2 + 1e-4).numpy().tobytes())
                elif dtype == "BF16":
                    w = (torch.randn(shape, generator=scale_gen) * 0.02).to(torch.bfloat16)
                    fh.write(w.view(torch.int16).numpy().tobytes())
                    del w
                else:
                    left = nbytes
                    off = (total * 7) % (len(pool_b) // 2)
                    while left:
                        n = min(left, len(pool_b) - off)
                        fh.write(pool_b[off : off + n])
                        left -= n
                        off = 0
                total += nbytes
            fh.flush()
            os.fsync(fh.fileno())
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (dest / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["DeepseekV3ForCausalLM"],
                "model_type": "deepseek_v3",
                "hidden_size": HIDDEN,
                "intermediate_size": INTER,
                "torch_dtype": "bfloat16",
                "quantization_config": {
                    "quant_method": "fp8",
                    "fmt": "e4m3",
                    "activation_scheme": "dynamic",
                    "weight_block_size": [BLOCK, BLOCK],
                },
            }
        )
    )
    (dest / "tokenizer.json").write_text("{}")
    return total


# -- measurements (each runs in its own process) ------------------------------------------------
def _fsync_dir_files(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _m_copy(src: Path, dst: Path, workers: int) -> dict[str, Any]:
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
        n += f.stat().st_size
    _fsync_dir_files(dst)
    return {"bytes_in": n, "bytes_out": n}


def _m_stream(src: Path, dst: Path, workers: int, to: str) -> dict[str, Any]:
    from flagrelease.convert import convert_checkpoint

    rep = convert_checkpoint(src, dst=dst, to=to, workers=workers)
    return {"bytes_in": rep.bytes_in, "bytes_out": rep.bytes_out}


def _m_naive(src: Path, dst: Path, workers: int, to: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    n_in = n_out = 0
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(f)
        n_in += sum(t.numel() * t.element_size() for t in tensors.values())
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            if to == "bf16" and t.dtype == torch.float8_e4m3fn:
                s = tensors[name + "_scale_inv"]
                r, c = t.shape
                full = s.repeat_interleave(BLOCK, 0)[:r].repeat_interleave(BLOCK, 1)[:, :c]
                out[name] = (t.float() * full).to(torch.bfloat16)
            elif (
                to == "int8"
                and t.dim() == 2
                and ".mlp.gate." not in name
                and "embed" not in name
                and "lm_head" not in name
            ):
                wf = t.float()
                scale = (wf.abs().amax(dim=1, keepdim=True) / 127.5).to(t.dtype)
                out[name] = torch.round(wf / scale.float()).clamp(-128, 127).to(torch.int8)
                out[name[: -len("weight")] + "weight_scale"] = scale
            else:
                out[name] = t
        save_file(out, dst / f.name)
        n_out += sum(t.numel() * t.element_size() for t in out.values())
        del tensors, out
    _fsync_dir_files(dst)
    return {"bytes_in": n_in, "bytes_out": n_out}


def _child(kind: str, src: str, dst: str, workers: int) -> None:
    t0 = time.perf_counter()
    if kind == "copy":
        res = _m_copy(Path(src), Path(dst), workers)
    elif kind == "stream-bf16":
        res = _m_stream(Path(src), Path(dst), workers, "bf16")
    elif kind == "stream-int8":
        res = _m_stream(Path(src), Path(dst), workers, "int8-w8a8")
    elif kind == "naive-bf16":
        res = _m_naive(Path(src), Path(dst), workers, "bf16")
    elif kind == "naive-int8":
        res = _m_naive(Path(src), Path(dst), workers, "int8")
    else:
        raise SystemExit(f"unknown measurement {kind}")
    res["seconds"] = time.perf_counter() - t0
    res["max_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(res))


def _peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM (ru_maxrss would include the parent's before exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def _measure(kind: str, src: Path, dst: Path, workers: int) -> dict[str, Any]:
    dropped = _drop_caches()
    proc = subprocess.run(
        [sys.executable, __file__, "_child", kind, str(src), str(dst), str(workers)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    res: dict[str, Any] = json.loads(line[len("RESULT ") :])
    res["caches_dropped"] = dropped
    res["gb_s_in"] = res["bytes_in"] / 1e9 / res["seconds"]
    res["gb_s_moved"] = (res["bytes_in"] + res["bytes_out"]) / 1e9 / res["seconds"]
    return res


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table and optionally write JSON."""
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] == "_child":
        _child(args_list[1], args_list[2], args_list[3], int(args_list[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=8.0, help="FP8 checkpoint size (default 8)")
    p.add_argument("--shard-gb", type=float, default=1.0, help="shard size (default 1)")
    p.add_argument("--dir", default=None, help="where the temporary folder goes (same disk for everything)")
    p.add_argument("--workers", type=int, default=0, help="converter threads (0: every core)")
    p.add_argument("--skip-naive", action="store_true", help="leave out the naive baseline")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(args_list)

    root = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir))
    results: dict[str, dict[str, Any]] = {}
    try:
        src = root / "fp8"
        t0 = time.perf_counter()
        n = generate_fp8_checkpoint(src, size_gb=args.size_gb, shard_gb=args.shard_gb)
        print(f"generated {n / 1e9:.2f} GB FP8 checkpoint in {time.perf_counter() - t0:.0f} s at {src}", flush=True)
        plan = [
            ("copy fp8", "copy", src, root / "copy-fp8", True),
            ("stream fp8->bf16", "stream-bf16", src, root / "bf16", False),
            ("naive fp8->bf16", "naive-bf16", src, root / "naive-bf16", True),
            ("copy bf16", "copy", root / "bf16", root / "copy-bf16", True),
            ("stream bf16->int8", "stream-int8", root / "bf16", root / "int8", True),
            ("naive bf16->int8", "naive-int8", root / "bf16", root / "naive-int8", True),
        ]
        for label, kind, s, d, remove in plan:
            if args.skip_naive and kind.startswith("naive"):
                continue
            res = _measure(kind, s, d, args.workers)
            results[label] = res
            print(
                f"{label:20s} {res['bytes_in'] / 1e9:7.2f} GB in {res['bytes_out'] / 1e9:7.2f} GB out "
                f"{res['seconds']:7.1f} s {res['gb_s_in']:6.3f} GB/s in  RSS {res['max_rss_mb']:7.0f} MB",
                flush=True,
            )
            if remove and not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    _print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"size_gb": args.size_gb, "results": results}, indent=2))
    return 0


def _print_table(results: dict[str, dict[str, Any]]) -> None:
    roof = {"fp8": results.get("copy fp8"), "bf16": results.get("copy bf16")}
    naive = {"fp8": results.get("naive fp8->bf16"), "bf16": results.get("naive bf16->int8")}
    print()
    print(
        f"{'measurement':20s} {'GB in':>7s} {'GB out':>7s} {'s':>7s} {'GB/s in':>8s} {'GB/s moved':>10s} "
        f"{'peak RSS MB':>11s} {'vs copy':>8s} {'vs naive':>8s}"
    )
    for label, r in results.items():
        key = "fp8" if "fp8" in label.split()[-1].split("->")[0] else "bf16"
        vs_copy = r["gb_s_in"] / roof[key]["gb_s_in"] if roof.get(key) and not label.startswith("copy") else None
        nv = naive.get(key)
        vs_naive = r["gb_s_in"] / nv["gb_s_in"] if nv and label.startswith("stream") else None
        print(
            f"{label:20s} {r['bytes_in'] / 1e9:7.2f} {r['bytes_out'] / 1e9:7.2f} {r['seconds']:7.1f} "
            f"{r['gb_s_in']:8.3f} {r['gb_s_moved']:10.3f} {r['max_rss_mb']:11.0f} "
            f"{'' if vs_copy is None else f'{vs_copy:.2f}x':>8s} {'' if vs_naive is None else f'{vs_naive:.2f}x':>8s}"
        )
    dropped = all(r.get("caches_dropped") for r in results.values())
    print("page cache: " + ("dropped before each measurement" if dropped else "NOT dropped (no permission)"))


if __name__ == "__main__":
    raise SystemExit(main())
