"""The weights of a loaded package: read lazily from its weight files, written back by offset.

``reading_weights`` lets coremltools' milproto loader build the program as usual, except that
a value stored in a weight file becomes a read-only view of the memory-mapped file (or, with
``lazy=False``, a read-only copy in memory) instead of being read, converted and copied, and a
const's value is read only when something asks for it: a sub-byte value (int4 codes, palette
indices, sparse masks), which coremltools' ``Program`` holds one byte per element, stays packed
until then. ``PackageWeights`` remembers where each such value is stored. ``export_program`` serialises a
program with coremltools' exporter, except that a value still stored in the input is
referred to at its old offset, neither written again nor read; only new values are appended to the
weight file, each distinct value once.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import attrs
import numpy as np
from coremltools import proto
from coremltools.converters.mil.backend.mil import helper as mil_helper
from coremltools.converters.mil.frontend.milproto.helper import proto_to_types
from coremltools.converters.mil.mil import Program, Var, types

from sdpa_slicer import _coreml_compat as compat
from sdpa_slicer._errors import BlobError
from sdpa_slicer._graph import bits
from sdpa_slicer._mlpackage.blobs import BLOB_TYPE_NAMES, BLOB_TYPES, BlobFile, BlobRecord, Progress

WEIGHT_FILE_NAME = "weight.bin"
MODEL_PATH_WEIGHT_FILE = f"@model_path/weights/{WEIGHT_FILE_NAME}"
"""How a program names the weight file that new values go into."""


@attrs.frozen
class StoredBlob:
    """Where a loaded value is stored in the input package."""

    file_name: str
    """As the program names the file, e.g. ``@model_path/weights/weight.bin``."""
    file: BlobFile = attrs.field(eq=False, repr=False)
    record: BlobRecord


class StoredValue:
    """A value stored in a weight file: where, its MIL dtype and shape, and its elements, read
    when asked. A value of a sub-byte type stays packed until then. It is the tag
    (``compat.value_tag``) of the vars that hold it: equal for every var reading the same blob."""

    def __init__(
        self,
        weights: PackageWeights,
        spec: proto.MIL_pb2.Value.BlobFileValue,
        blob: StoredBlob,
        dtype: Any,
        shape: tuple[int, ...],
    ) -> None:
        self.weights = weights
        self.spec = spec
        """How the program refers to it."""
        self.blob = blob
        self.dtype = dtype
        self.shape = shape
        self.nptype = np.dtype(types.nptype_from_builtin(dtype))
        self.packed = types.is_sub_byte(dtype)
        self._packed_bytes: Optional[np.ndarray] = None
        self._value: Optional[np.ndarray] = None
        if self.packed and not weights.lazy:
            self._packed_bytes = self.packed_bytes().copy()

    def __eq__(self, other: object) -> bool:
        """Two values read from the same blob are the same stored value."""
        return isinstance(other, StoredValue) and other.blob == self.blob

    def __hash__(self) -> int:
        return hash(self.blob)

    def packed_bytes(self) -> np.ndarray:
        """The stored bytes, as they are in the file (or, loaded not lazily, in memory)."""
        if self._packed_bytes is not None:
            return self._packed_bytes
        return self.blob.file.data(self.blob.record, np.dtype(np.uint8))

    def read(self) -> np.ndarray:
        """The elements, read-only: a view of the mapped file (a copy when not lazy), or, for a
        sub-byte type, unpacked one byte per element; read once, then kept."""
        if self._value is not None:
            return self._value
        if self.packed:
            signed = not self.dtype.is_unsigned()
            count = math.prod(self.shape)
            unpacked = compat.unpack_sub_byte(self.packed_bytes(), self.dtype.get_bitwidth(), count, signed)
            value = unpacked.reshape(self.shape).astype(self.nptype)
        else:
            value = self.blob.file.data(self.blob.record, self.nptype).reshape(self.shape)
            if not self.weights.lazy:
                value = value.copy()
        value.flags.writeable = False  # a change in place would be lost: the saved package keeps the stored bytes
        self.weights.remember(value, self.blob)
        self._value = value
        return value

    def placeholder(self) -> np.ndarray:
        """An array of the value's dtype and shape that takes no memory (every element the same
        zero): what coremltools builds the const op from before ``read_when_asked`` gives it the value."""
        return np.lib.stride_tricks.as_strided(
            np.zeros(1, dtype=self.nptype), shape=self.shape, strides=(0,) * len(self.shape), writeable=False
        )

    def ones(self) -> int:
        """The number of ones among the elements of a ``uint1`` value, counted in its packed bytes."""
        return compat.set_bits(self.packed_bytes(), math.prod(self.shape))


class PackageWeights:
    """The weight files of one package, opened as the program refers to them, and the values read from them."""

    def __init__(self, folder: Optional[Path], lazy: bool) -> None:
        self.folder = folder
        self.lazy = lazy
        self._files: dict[str, BlobFile] = {}
        self._stored: dict[int, tuple[np.ndarray, StoredBlob]] = {}
        self._by_kind: Optional[dict[tuple[str, tuple[int, ...]], list[tuple[np.ndarray, StoredBlob]]]] = None

    @property
    def files(self) -> tuple[BlobFile, ...]:
        return tuple(self._files.values())

    def value(self, value_spec: proto.MIL_pb2.Value) -> np.ndarray:
        """The tensor a program's blob-file value holds, checked against its record; read-only.
        A value of a sub-byte type is unpacked, one byte per element."""
        return self.stored(value_spec).read()

    def stored(self, value_spec: proto.MIL_pb2.Value) -> StoredValue:
        """A program's blob-file value, checked against its record, not read yet."""
        value_type = proto_to_types(value_spec.type)
        dtype, shape = value_type.get_primitive(), tuple(int(n) for n in value_type.get_shape())
        file_value = value_spec.blobFileValue
        blob_file = self._file(file_value.fileName)
        record = blob_file.record(file_value.offset)
        _check_record(blob_file, record, dtype, math.prod(shape))
        return StoredValue(self, file_value, StoredBlob(file_value.fileName, blob_file, record), dtype, shape)

    def remember(self, value: np.ndarray, blob: StoredBlob) -> None:
        self._stored[id(value)] = (value, blob)
        self._by_kind = None

    def holds(self, blob: StoredBlob) -> bool:
        """Whether ``blob`` is in one of the files this package's program was read from."""
        return self._files.get(blob.file_name.split("/")[-1]) is blob.file

    def find(self, value: Any) -> Optional[StoredBlob]:
        """Where ``value`` is stored, if it is a value this package read and nothing replaced it."""
        entry = self._stored.get(id(value))
        return entry[1] if entry is not None and entry[0] is value else None

    def find_equal(self, value: np.ndarray, type_name: str) -> Optional[StoredBlob]:
        """A stored value of the same MIL type, shape and bytes as ``value``."""
        if self._by_kind is None:
            self._by_kind = defaultdict(list)
            for stored, blob in self._stored.values():
                self._by_kind[(BLOB_TYPE_NAMES[blob.record.data_type], stored.shape)].append((stored, blob))
        data = _bytes(value)
        for stored, blob in self._by_kind.get((type_name, value.shape), []):
            if _bytes(stored) == data:
                return blob
        return None

    def changed_files(self) -> list[Path]:
        """Weight files that are no longer what was mapped: their values can no longer be trusted."""
        return [blob_file.path for blob_file in self._files.values() if not blob_file.unchanged()]

    def copy_files(self, folder: Path, progress: Optional[Progress] = None) -> None:
        """Copy every opened weight file, as mapped, into ``folder``."""
        for name, blob_file in self._files.items():
            blob_file.copy_to(folder / name, progress)

    def _file(self, file_name: str) -> BlobFile:
        name = file_name.split("/")[-1]  # "@model_path/weights/weight.bin", as coremltools resolves it
        blob_file = self._files.get(name)
        if blob_file is None:
            if self.folder is None:
                raise BlobError(f"the program refers to weight file {name} but the package has no weights folder")
            blob_file = BlobFile(self.folder / name)
            self._files[name] = blob_file
        return blob_file


def _check_record(blob_file: BlobFile, record: BlobRecord, dtype: Any, count: int) -> None:
    name = types.builtin_to_string(dtype)
    expected = (BLOB_TYPES.get(name), (count * bits(dtype) + 7) // 8)
    if (record.data_type, record.size) != expected:
        held = BLOB_TYPE_NAMES.get(record.data_type, f"type {record.data_type}")
        raise BlobError(
            f"weight file {blob_file.path.name} is damaged: the blob at offset {record.offset} holds {record.size} "
            f"bytes of {held}, the program expects {expected[1]} bytes of {name}"
        )


def _bytes(value: np.ndarray) -> bytes:
    return np.ascontiguousarray(value).tobytes()


@contextlib.contextmanager
def reading_weights(weights: PackageWeights, on_op: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """While active, coremltools' milproto loader takes weight-file values from ``weights`` and
    calls ``on_op`` after each op it has built.

    The value of a const op stored in a weight file is read only when something asks for it
    (``compat.read_when_asked``): the loader builds the op from a placeholder of the value's
    dtype and shape, then the op gets the ``StoredValue``. So a sub-byte value (int4 codes,
    palette indices, sparse masks) stays packed unless it is used; a sparse mask's ones are
    counted in its packed bytes.
    """
    building: list[StoredValue] = []
    """The stored values of the op being built, not yet handed to the loader."""
    placeholders: dict[int, tuple[np.ndarray, StoredValue]] = {}
    """The placeholders handed to the loader for the op being built, by the address of their one
    element (coremltools may hold a view of one, not the one given)."""

    def value(load_value: Callable[[Any, Any], Any], context: Any, value_spec: proto.MIL_pb2.Value) -> Any:
        for index, stored in enumerate(building):
            if value_spec.blobFileValue == stored.spec:
                del building[index]
                if not stored.packed:
                    return stored.read()
                placeholder = stored.placeholder()
                placeholders[_address(placeholder)] = (placeholder, stored)
                return placeholder
        if _is_stored_tensor(value_spec):
            return weights.value(value_spec)
        return load_value(context, value_spec)

    def operation(load_operation: Callable[[Any, Any], None], context: Any, op_spec: proto.MIL_pb2.Operation) -> None:
        stored = _stored_arguments(weights, op_spec)
        building[:] = stored.values()
        try:
            load_operation(context, op_spec)
        finally:
            building.clear()
            placeholders.clear()
        if stored:
            op = compat.loaded_var(context, op_spec.outputs[0].name).op
            for name, value in stored.items():
                var = op.outputs[0] if op.op_type == "const" else op.inputs[name]
                compat.read_when_asked(var, value.read, value)
        if on_op is not None:
            on_op()

    def mask_ones(mask: Var) -> Optional[int]:
        stored = stored_value(mask)
        if stored is not None:
            return stored.ones() if stored.packed and not compat.value_was_read(mask) else None
        value = mask.val  # a const of the op being built holds its placeholder, or a view of it
        found = placeholders.get(_address(value)) if isinstance(value, np.ndarray) else None
        return None if found is None else found[1].ones()

    with compat.milproto_loader_hooks(value, operation, mask_ones):
        yield


def stored_value(var: Var) -> Optional[StoredValue]:
    """Where ``var``'s value is stored, if it is a loaded const's value nothing has replaced."""
    tag = compat.value_tag(var)
    return tag if isinstance(tag, StoredValue) else None


def _address(value: np.ndarray) -> int:
    return int(value.__array_interface__["data"][0])


def _is_stored_tensor(value_spec: proto.MIL_pb2.Value) -> bool:
    return (
        value_spec.WhichOneof("value") == "blobFileValue"
        and not value_spec.docString
        and types.is_tensor(proto_to_types(value_spec.type))
    )


def _stored_arguments(weights: PackageWeights, op_spec: proto.MIL_pb2.Operation) -> dict[str, StoredValue]:
    """The values stored in a weight file that a const op holds, or that a ``constexpr_*`` op
    reads as attributes (before iOS18) or as values bound to its inputs (from iOS18), by argument."""
    if op_spec.type != "const" and not op_spec.type.startswith("constexpr_"):
        return {}
    values = dict(op_spec.attributes.items())
    for name, argument in op_spec.inputs.items():
        if len(argument.arguments) == 1 and argument.arguments[0].WhichOneof("binding") == "value":
            values[name] = argument.arguments[0].value
    return {name: weights.stored(value) for name, value in values.items() if _is_stored_tensor(value)}


def export_program(
    prog: Program, weights_dir: Path, specification_version: int, weights: PackageWeights
) -> proto.MIL_pb2.Program:
    """``prog`` as a milproto program with coremltools' exporter, except that a value stored in
    ``weights`` is referred to where it is, and only new values are appended to
    ``weights_dir/weight.bin``, each distinct one once."""
    written: dict[tuple[str, tuple[int, ...], bytes], list[tuple[np.ndarray, proto.MIL_pb2.Value]]] = defaultdict(list)

    def open_writer(weight_path: str) -> Any:
        """A writer appending to the weight file copied from the input, if there is one."""
        os.makedirs(os.path.dirname(weight_path), exist_ok=True)
        exists = os.path.exists(weight_path)
        if exists:
            BlobFile(Path(weight_path))  # the header must be sound to append: a one-line error if not
        return compat.blob_writer(weight_path, truncate=not exists)

    def file_value(var: Var, write: Callable[[], int]) -> proto.MIL_pb2.Value:
        value = var.val
        primitive = var.sym_type.get_primitive() if types.is_tensor(var.sym_type) else var.sym_type
        type_name = types.builtin_to_string(primitive)
        data_type = mil_helper.types_to_proto_primitive(primitive)
        stored = weights.find(value) or weights.find_equal(value, type_name)
        if stored is not None:
            return mil_helper.create_file_value_tensor(stored.file_name, stored.record.offset, value.shape, data_type)
        data = _bytes(value)
        same_kind = written[(type_name, value.shape, hashlib.blake2b(data, digest_size=16).digest())]
        for same, stored_value in same_kind:
            if _bytes(same) == data:
                return stored_value
        new_value = mil_helper.create_file_value_tensor(MODEL_PATH_WEIGHT_FILE, write(), value.shape, data_type)
        same_kind.append((value, new_value))
        return new_value

    def stored_file_value(var: Var) -> Optional[proto.MIL_pb2.Value]:
        """A loaded const's value, where it is stored: never read, so a packed value stays packed."""
        stored = stored_value(var)
        if stored is None or not weights.holds(stored.blob):
            return None
        data_type = mil_helper.types_to_proto_primitive(stored.dtype)
        return mil_helper.create_file_value_tensor(
            stored.blob.file_name, stored.blob.record.offset, stored.shape, data_type
        )

    return compat.export_program(
        prog, str(weights_dir), specification_version, open_writer, file_value, stored_file_value
    )
