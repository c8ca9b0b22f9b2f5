"""File I/O of the streaming converter: direct I/O where the file system allows it.

Buffered writes copy every byte into freshly allocated page-cache pages, which on small
VMs costs more CPU than the conversion itself.  With ``O_DIRECT`` the disk reads into and
writes from our own reused, page-aligned buffers instead:

- :class:`SourceFile` reads a byte range by reading the enclosing aligned range.
- :class:`ShardWriter` gathers pieces (written in any order, from any thread) into
  aligned segments and writes each segment once it is complete.

Where ``O_DIRECT`` is refused (tmpfs, some network file systems) both fall back to plain
``pread``/``pwrite``.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from pathlib import Path

import torch

__all__ = ["ALIGN", "SEGMENT_BYTES", "AlignedBuffer", "BufferPool", "ShardWriter", "SourceFile"]

#: Alignment of direct I/O offsets, lengths and buffers.
ALIGN = 4096
#: Bytes gathered per direct write.
SEGMENT_BYTES = 8 << 20

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _down(n: int) -> int:
    return n & ~(ALIGN - 1)


def _up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class AlignedBuffer:
    """A page-aligned, reusable byte buffer (anonymous mmap) seen as a uint8 tensor."""

    def __init__(self, size: int) -> None:
        self.size = _up(max(size, 1))
        self._map = mmap.mmap(-1, self.size)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.view = memoryview(self._map)

    def close(self) -> None:
        """Release the memory (views must be gone)."""
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self.view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


class BufferPool:
    """Segment buffers handed out and taken back, so their pages are touched once."""

    def __init__(self, size: int = SEGMENT_BYTES) -> None:
        self.size = size
        self._free: list[AlignedBuffer] = []
        self._lock = threading.Lock()
        self.allocated = 0

    def get(self) -> AlignedBuffer:
        """A buffer of :attr:`size` bytes."""
        with self._lock:
            if self._free:
                return self._free.pop()
            self.allocated += 1
        return AlignedBuffer(self.size)

    def put(self, buf: AlignedBuffer) -> None:
        """Give ``buf`` back."""
        with self._lock:
            self._free.append(buf)

    def close(self) -> None:
        """Release every free buffer."""
        with self._lock:
            bufs, self._free = self._free, []
        for b in bufs:
            b.close()


def _open_direct(path: Path, flags: int, mode: int = 0o644) -> int | None:
    if not _O_DIRECT:
        return None
    try:
        return os.open(path, flags | _O_DIRECT, mode)
    except OSError:
        return None


class SourceFile:
    """A source shard opened for reading byte ranges (direct I/O when possible)."""

    def __init__(self, path: Path, *, direct: bool = True) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.fd = os.open(self.path, os.O_RDONLY)
        self.dfd = _open_direct(self.path, os.O_RDONLY) if direct else None

    def close(self) -> None:
        """Close the descriptors."""
        for fd in (self.fd, self.dfd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd, self.dfd = -1, None

    def read(
        self, offset: int, nbytes: int, local: threading.local, *, align: int = 1, slot: str = "main"
    ) -> torch.Tensor:
        """Bytes ``[offset, offset + nbytes)`` as a uint8 tensor, valid until this thread's next read of ``slot``.

        Args:
            offset: file offset.
            nbytes: bytes wanted.
            local: the calling thread's storage (holds its read buffers).
            align: the tensor's start is a multiple of this (the element size it will be viewed as).
            slot: which of the thread's buffers to use (one per tensor kept at the same time).
        """
        if self.dfd is not None:
            start = _down(offset)
            length = _up(offset + nbytes) - start
            buf = self._buffer(local, f"{slot}:direct", length)
            try:
                self._fill(self.dfd, buf.view, start, length, offset + nbytes - start)
            except OSError:
                self.dfd = None  # the file system took the open but refuses the reads
            else:
                lo = offset - start
                if lo % align == 0:
                    return buf.tensor[lo : lo + nbytes]
                copy = self._buffer(local, f"{slot}:unaligned", nbytes)
                copy.tensor[:nbytes].copy_(buf.tensor[lo : lo + nbytes])
                return copy.tensor[:nbytes]
        buf = self._buffer(local, f"{slot}:read", nbytes)
        self._fill(self.fd, buf.view, offset, nbytes, nbytes)
        return buf.tensor[:nbytes]

    def _fill(self, fd: int, view: memoryview, offset: int, length: int, need: int) -> None:
        got = 0
        while got < need:
            n = os.preadv(fd, [view[got:length]], offset + got)
            if n <= 0:
                raise EOFError(f"{self.path.name}: unexpected end of file at byte {offset + got}")
            got += n

    @staticmethod
    def _buffer(local: threading.local, name: str, size: int) -> AlignedBuffer:
        bufs: dict[str, AlignedBuffer] = local.__dict__.setdefault("io_buffers", {})
        buf = bufs.get(name)
        if buf is None or buf.size < size:
            if buf is not None:
                buf.close()
            buf = bufs[name] = AlignedBuffer(max(size, 1 << 20))
        return buf


class _Segment:
    __slots__ = ("buf", "filled", "length")

    def __init__(self, buf: AlignedBuffer, length: int) -> None:
        self.buf = buf
        self.filled = 0
        self.length = length


class ShardWriter:
    """Writes one output file whose size is known, from pieces written in any order.

    Every byte of the file must be written exactly once (a safetensors file has no
    holes). With direct I/O, pieces are copied into aligned segments and each segment is
    written when full; otherwise each piece is written with ``pwrite`` at once.
    """

    def __init__(self, path: Path, *, size: int, pool: BufferPool, direct: bool = True) -> None:
        self.path = Path(path)
        self.size = size
        self.pool = pool
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.dfd = _open_direct(self.path, os.O_RDWR) if direct else None
        self.staged = self.dfd is not None
        self._segments: dict[int, _Segment] = {}
        self._lock = threading.Lock()
        self.accepted = 0
        if not self.staged:
            os.ftruncate(self.fd, size)

    def write(self, offset: int, data: torch.Tensor) -> None:
        """Write ``data`` (a contiguous CPU tensor, any dtype) at ``offset``; thread-safe."""
        raw = data.reshape(-1).view(torch.uint8)
        n = raw.numel()
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"{self.path.name}: write of {n} bytes at {offset} exceeds the file size {self.size}")
        with self._lock:
            self.accepted += n
        if not self.staged:
            _pwrite_all(self.fd, memoryview(raw.numpy()), offset)  # type: ignore[arg-type]
            return
        seg_size = self.pool.size
        pos = 0
        while pos < n:
            index = (offset + pos) // seg_size
            seg_start = index * seg_size
            lo = offset + pos - seg_start
            take = min(n - pos, seg_size - lo)
            with self._lock:
                seg = self._segments.get(index)
                if seg is None:
                    seg = self._segments[index] = _Segment(self.pool.get(), min(seg_size, self.size - seg_start))
            seg.buf.tensor[lo : lo + take].copy_(raw[pos : pos + take])
            with self._lock:
                seg.filled += take
                full = seg.filled == seg.length
                if full:
                    del self._segments[index]
            if full:
                self._flush(seg_start, seg)
            pos += take

    def _flush(self, start: int, seg: _Segment) -> None:
        try:
            dfd = self.dfd
            if dfd is not None:
                try:
                    _pwrite_all(dfd, seg.buf.view[: _up(seg.length)], start)
                    return
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    self.dfd = None  # accepted at open, refused at write: go buffered
            _pwrite_all(self.fd, seg.buf.view[: seg.length], start)
        finally:
            self.pool.put(seg.buf)

    def close(self) -> None:
        """Check completeness, trim the padding of the last segment, fsync and close.

        Raises:
            ValueError: some bytes were never written (a bug in the caller).
        """
        with self._lock:
            pending = len(self._segments)
        if pending or self.accepted != self.size:
            self.abort()
            raise ValueError(f"{self.path.name}: {self.size - self.accepted} of {self.size} bytes were never written")
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        self._close_fds()

    def abort(self) -> None:
        """Close without checking; return the buffers (the caller removes the file)."""
        with self._lock:
            segs, self._segments = list(self._segments.values()), {}
        for seg in segs:
            self.pool.put(seg.buf)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self.dfd, self.fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.dfd, self.fd = None, -1


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
