"""BlobFile: coremltools' weight files read as coremltools reads them, damage refused, copies exact."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter

from packages import WEIGHT_FILE, blob_values
from sdpa_slicer._mlpackage import blobs as _blobs
from sdpa_slicer._mlpackage.blobs import BLOB_TYPE_NAMES, BLOB_TYPES, HEADER_SIZE, RECORD_SIZE, BlobError, BlobFile

BYTE_TYPES = {
    "fp16": ("fp16", np.uint16),
    "fp32": ("float", np.float32),
    "int8": ("int8", np.int8),
    "uint8": ("uint8", np.uint8),
}
"""MIL type -> (coremltools' reader method ``read_<name>_data``, the NumPy type it returns)."""
SMALL_CHUNK = 100


def _check_records(package: Path) -> set[str]:
    """Check every stored value's record and, for whole-byte types, its bytes against coremltools'
    reader; return the types met."""
    blob_file = BlobFile(package / WEIGHT_FILE)
    reader = _BlobStorageReader(str(package / WEIGHT_FILE))
    offsets = {value.blobFileValue.offset for values in blob_values(package).values() for value in values.values()}
    types_seen = set()
    for offset in sorted(offsets):
        record = blob_file.record(offset)
        name = BLOB_TYPE_NAMES[record.data_type]
        types_seen.add(name)
        if name in BYTE_TYPES:
            method, nptype = BYTE_TYPES[name]
            expected = getattr(reader, f"read_{method}_data")(offset)
            assert blob_file.data(record, np.dtype(nptype)).tobytes() == np.asarray(expected, dtype=nptype).tobytes()
    return types_seen


def test_every_stored_value_has_the_record_and_bytes_coremltools_reads(single_package: Path) -> None:
    assert _check_records(single_package) == {"fp32", "int8"}


def test_compressed_values_have_the_records_coremltools_reads(kv_package: Path) -> None:
    assert _check_records(kv_package) & {"int8", "uint4"}


def test_appended_blobs_are_found_where_coremltools_writes_them(tmp_path: Path) -> None:
    path = tmp_path / "weight.bin"
    writer = _BlobStorageWriter(str(path))
    values = [np.arange(n, dtype=np.float32) for n in (10, 33, 64)]
    offsets = [writer.write_float_data(value) for value in values]
    del writer
    blob_file = BlobFile(path)
    for offset, value in zip(offsets, values):
        record = blob_file.record(offset)
        assert (record.data_type, record.size, record.data_offset % 64) == (BLOB_TYPES["fp32"], value.nbytes, 0)
        np.testing.assert_array_equal(blob_file.data(record, np.dtype(np.float32)), value)
        assert not blob_file.data(record, np.dtype(np.float32)).flags.writeable


def _written(path: Path, sizes: tuple[int, ...]) -> tuple[list[int], list[np.ndarray]]:
    """A weight file of fp32 values of ``sizes``, written by coremltools: their offsets and values."""
    writer = _BlobStorageWriter(str(path))
    values = [np.arange(n, dtype=np.float32) - n / 2 for n in sizes]
    offsets = [writer.write_float_data(value) for value in values]
    del writer
    return offsets, values


def test_records_walks_every_blob_coremltools_wrote(tmp_path: Path) -> None:
    offsets, values = _written(tmp_path / "weight.bin", (10, 33, 64, 1))
    blob_file = BlobFile(tmp_path / "weight.bin")
    records = blob_file.records()
    assert [record.offset for record in records] == offsets and blob_file.blob_count == 4
    assert sum(blob_file.span(record) for record in records) == blob_file.size - HEADER_SIZE


def test_a_compacted_file_holds_the_kept_blobs_as_coremltools_reads_them(tmp_path: Path) -> None:
    offsets, values = _written(tmp_path / "weight.bin", (10, 33, 64, 100))
    blob_file = BlobFile(tmp_path / "weight.bin")
    kept = [1, 3]
    moved = blob_file.write_compacted(tmp_path / "compact.bin", [blob_file.record(offsets[index]) for index in kept])
    reader = _BlobStorageReader(str(tmp_path / "compact.bin"))
    for index in kept:
        np.testing.assert_array_equal(reader.read_float_data(moved[offsets[index]]), values[index])
    compacted = BlobFile(tmp_path / "compact.bin")
    assert [record.offset for record in compacted.records()] == sorted(moved.values())
    assert compacted.size == HEADER_SIZE + sum(blob_file.span(blob_file.record(offsets[index])) for index in kept)


@pytest.mark.parametrize(
    "offset_in, message",
    [
        (lambda size: 0, "is damaged: offset 0 is inside its header"),
        (lambda size: HEADER_SIZE + 1, "is damaged: no blob record at offset 65"),
        (lambda size: size - RECORD_SIZE // 2, "is truncated: no blob record at offset"),
    ],
    ids=["in the header", "not a record", "past the end"],
)
def test_an_offset_without_a_record_is_refused(
    offset_in: Callable[[int], int], message: str, single_package: Path
) -> None:
    blob_file = BlobFile(single_package / WEIGHT_FILE)
    with pytest.raises(BlobError, match=message):
        blob_file.record(offset_in(blob_file.size))


def test_a_missing_file_is_a_blob_error(tmp_path: Path) -> None:
    with pytest.raises(BlobError, match="cannot open weight file weight.bin: No such file"):
        BlobFile(tmp_path / "weight.bin")


def _kernel_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_blobs, "COPY_CHUNK", SMALL_CHUNK)


def _no_kernel_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(_blobs, "COPY_CHUNK", SMALL_CHUNK)
    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)


@pytest.mark.parametrize("way", [_kernel_copy, _no_kernel_copy], ids=["in the kernel", "through the mapping"])
def test_a_copy_is_exact_and_reports_every_byte(
    way: Callable[[pytest.MonkeyPatch], None], single_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    way(monkeypatch)
    blob_file = BlobFile(single_package / WEIGHT_FILE)
    reported: list[int] = []
    blob_file.copy_to(tmp_path / "copy.bin", reported.append)
    assert (tmp_path / "copy.bin").read_bytes() == (single_package / WEIGHT_FILE).read_bytes()
    assert sum(reported) == blob_file.size and len(reported) == -(-blob_file.size // SMALL_CHUNK)


def test_a_file_that_ends_while_being_copied_fails(
    single_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0, raising=False)
    with pytest.raises(OSError, match="ended while being copied"):
        BlobFile(single_package / WEIGHT_FILE).copy_to(tmp_path / "copy.bin")


def _replace(path: Path) -> None:
    os.replace(shutil.copy(path, path.with_suffix(".new")), path)


@pytest.mark.parametrize(
    "change, unchanged",
    [(lambda path: None, True), (lambda path: os.utime(path, ns=(0, 0)), False), (_replace, False)],
    ids=["untouched", "touched", "replaced"],
)
def test_unchanged_tells_whether_the_file_is_still_the_one_mapped(
    change: Callable[[Path], None], unchanged: bool, single_package: Path, tmp_path: Path
) -> None:
    path = Path(shutil.copy(single_package / WEIGHT_FILE, tmp_path / "weight.bin"))
    blob_file = BlobFile(path)
    change(path)
    assert blob_file.unchanged() is unchanged
