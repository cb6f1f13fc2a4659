"""The weight file of an ML program (``weights/weight.bin``), opened read-only and memory-mapped.

The layout is coremltools' MIL blob storage, version 2, little-endian:

- a 64-byte header: the number of blobs (uint32), the format version (uint32, 2), zeros;
- per blob, at a 64-byte aligned offset, a 64-byte metadata record: the sentinel ``0xDEADBEEF``
  (uint32), the data type (uint32), the size of the data in bytes (uint64), the offset of the
  data (uint64), the unused bits at the end of sub-byte data (int64), zeros;
- the data of each blob, 64-byte aligned, after its record.

A program names a blob by the offset of its metadata record. ``BlobFile`` reads only the
records asked for, checks each against the file and what the program says it holds, and
hands out the data as read-only NumPy views of the mapping, so the operating system reads a
value's pages only when something touches them.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import weakref
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Optional

import attrs
import numpy as np

from sdpa_slicer._errors import BlobError

HEADER_SIZE = 64
RECORD_SIZE = 64
SENTINEL = 0xDEADBEEF
FORMAT_VERSION = 2
HEADER = struct.Struct("<II")
RECORD = struct.Struct("<IIQQq")
DATA_OFFSET_FIELD = 16
"""Where in a record the offset of its data is."""
ALIGNMENT = 64
BLOB_TYPES: Mapping[str, int] = {
    "fp16": 1,
    "fp32": 2,
    "uint8": 3,
    "int8": 4,
    "bf16": 5,
    "int16": 6,
    "uint16": 7,
    "int4": 8,
    "uint1": 9,
    "uint2": 10,
    "uint4": 11,
    "uint3": 12,
    "uint6": 13,
    "int32": 14,
    "uint32": 15,
}
"""The data type codes of blob records, by MIL type name."""
BLOB_TYPE_NAMES = {code: name for name, code in BLOB_TYPES.items()}
COPY_CHUNK = 64 * 1024 * 1024
"""Bytes copied between two progress reports."""
NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM})
"""``copy_file_range`` errors that mean "not between these files": copy through the mapping instead."""

Progress = Callable[[int], None]
"""Told the number of bytes just copied."""


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


@attrs.frozen
class BlobRecord:
    """One blob's metadata record."""

    offset: int
    """Where the record starts: the offset the program refers to."""
    data_type: int
    size: int
    """Bytes of data."""
    data_offset: int


class BlobFile:
    """A weight file opened read-only and memory-mapped for as long as this object or a view of it lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise BlobError(f"cannot open weight file {path.name}: {error.strerror or error}") from error
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        status = os.fstat(fd)
        self.size = status.st_size
        self._identity = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        if self.size < HEADER_SIZE:
            raise BlobError(f"weight file {path.name} is truncated: {self.size} bytes, shorter than its header")
        self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        _, version = HEADER.unpack_from(self._map, 0)
        if version != FORMAT_VERSION:
            raise BlobError(
                f"weight file {path.name} has format version {version}; only version {FORMAT_VERSION} is known"
            )
        self._records: dict[int, BlobRecord] = {}

    def record(self, offset: int) -> BlobRecord:
        """The metadata record at ``offset``, checked to lie in the file with all its data."""
        found = self._records.get(offset)
        if found is not None:
            return found
        if offset < HEADER_SIZE:
            raise BlobError(f"weight file {self.path.name} is damaged: offset {offset} is inside its header")
        if offset + RECORD_SIZE > self.size:
            raise BlobError(
                f"weight file {self.path.name} is truncated: no blob record at offset {offset} of {self.size} bytes"
            )
        sentinel, data_type, size, data_offset, _ = RECORD.unpack_from(self._map, offset)
        if sentinel != SENTINEL:
            raise BlobError(f"weight file {self.path.name} is damaged: no blob record at offset {offset}")
        if data_offset < offset + RECORD_SIZE or data_offset + size > self.size:
            raise BlobError(
                f"weight file {self.path.name} is truncated: the blob at offset {offset} needs bytes "
                f"{data_offset} to {data_offset + size}, the file has {self.size}"
            )
        found = BlobRecord(offset=offset, data_type=data_type, size=size, data_offset=data_offset)
        self._records[offset] = found
        return found

    def data(self, record: BlobRecord, dtype: np.dtype) -> np.ndarray:
        """The record's data as a flat read-only view of ``dtype``."""
        return np.frombuffer(self._map, dtype=dtype, count=record.size // dtype.itemsize, offset=record.data_offset)

    @property
    def blob_count(self) -> int:
        """The number of blobs the header says the file holds."""
        return int(HEADER.unpack_from(self._map, 0)[0])

    def records(self) -> list[BlobRecord]:
        """Every blob record of the file, in file order (each one's data ends where the next
        record starts, 64-byte aligned)."""
        found, offset = [], HEADER_SIZE
        for _ in range(self.blob_count):
            record = self.record(offset)
            found.append(record)
            offset = _aligned(record.data_offset + record.size)
        return found

    def span(self, record: BlobRecord) -> int:
        """The bytes ``record`` takes in the file: its metadata, its data and the padding after it
        (none after the last blob)."""
        return min(_aligned(record.data_offset + record.size), self.size) - record.offset

    def write_compacted(self, destination: Path, kept: list[BlobRecord]) -> dict[int, int]:
        """Write the new weight file ``destination`` holding only the blobs of ``kept`` (in file
        order), each record and its data as they are here; return each one's new offset by old."""
        moved: dict[int, int] = {}
        with open(destination, "xb", buffering=0) as out:  # unbuffered: copy_file_range moves the file position
            out.write(HEADER.pack(len(kept), FORMAT_VERSION).ljust(HEADER_SIZE, b"\0"))
            for index, record in enumerate(sorted(kept, key=lambda record: record.offset)):
                if index:
                    out.write(bytes(_aligned(out.tell()) - out.tell()))
                position = out.tell()
                moved[record.offset] = position
                metadata = bytearray(self._map[record.offset : record.offset + RECORD_SIZE])
                struct.pack_into("<Q", metadata, DATA_OFFSET_FIELD, position + RECORD_SIZE)
                out.write(metadata)
                self._copy_range(out, record.data_offset, record.size)
        return moved

    def _copy_range(self, out: BinaryIO, start: int, count: int) -> None:
        """Append ``count`` bytes of this file from ``start`` to the unbuffered ``out``, in the kernel where it can."""
        end = start + count
        while start < end:
            copied = 0
            if hasattr(os, "copy_file_range"):
                try:
                    copied = os.copy_file_range(self._fd, out.fileno(), min(COPY_CHUNK, end - start), start)
                except OSError as error:
                    if error.errno not in NO_KERNEL_COPY:
                        raise
            if copied <= 0:
                copied = out.write(memoryview(self._map)[start : min(end, start + COPY_CHUNK)]) or 0
            if copied <= 0:
                raise OSError(errno.EIO, f"weight file {self.path} ended while being copied")
            start += copied

    def unchanged(self) -> bool:
        """Whether the file at ``path`` is still the one mapped, with the same size and modification time."""
        try:
            status = os.stat(self.path)
        except OSError:
            return False
        return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns) == self._identity

    def copy_to(self, destination: Path, progress: Optional[Progress] = None) -> None:
        """Write the whole file, as mapped, to the new file ``destination``; in the kernel where it can."""
        with open(destination, "xb") as out:
            position, kernel_copy = 0, hasattr(os, "copy_file_range")
            while position < self.size:
                count = min(COPY_CHUNK, self.size - position)
                copied = 0
                if kernel_copy:
                    try:
                        copied = os.copy_file_range(self._fd, out.fileno(), count, position)
                    except OSError as error:
                        if error.errno not in NO_KERNEL_COPY:
                            raise
                        kernel_copy = False
                if not kernel_copy:
                    out.seek(position)
                    copied = out.write(memoryview(self._map)[position : position + count])
                if copied <= 0:
                    raise OSError(errno.EIO, f"weight file {self.path} ended while being copied")
                position += copied
                if progress is not None:
                    progress(copied)
