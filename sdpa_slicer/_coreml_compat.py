"""Every use of coremltools' private internals, each behind one named function.

sdpa_slicer needs a few things coremltools does not offer publicly: where an op sits in its
block's linked list, copying scope info, hooks into the milproto loader and exporter, loading
the same way in every run, its blob writer, its sub-byte unpacking, values a var reads only
when asked (so that packed weights stay packed), the check of a sparse mask's ones, the newest
opset a program uses and the op types of an opset. They are all here, so that a coremltools
upgrade breaks one module, and says so: an internal that moved raises
``CoremltoolsInternalsError`` naming it and the installed coremltools version, instead of an
``AttributeError`` deep inside a rewrite. ``tests/test_coreml_compat.py`` calls every function.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections import defaultdict
from typing import Any, Callable, Iterator, Optional, Sequence

import coremltools
import numpy as np
from coremltools import proto
from coremltools.converters.mil import Builder
from coremltools.converters.mil.backend.mil import helper as mil_helper
from coremltools.converters.mil.backend.mil import load as mil_backend
from coremltools.converters.mil.frontend.milproto import load as milproto
from coremltools.converters.mil.mil import Block, Operation, Program, Var, types

from sdpa_slicer._errors import CoremltoolsInternalsError

TESTED_VERSION = "9.0"
"""The coremltools release every internal here was checked against."""

_LOADER_LOCK = threading.RLock()

ValueHook = Callable[[Callable[[Any, Any], Any], Any, Any], Any]
"""Called with the loader's own value loader, its context and a value spec; returns the value."""
OperationHook = Callable[[Callable[[Any, Any], None], Any, Any], None]
"""Called with the loader's own op loader, its context and an op spec; builds the op (by calling it)."""
MaskOnes = Callable[[Var], Optional[int]]
"""The number of ones in a sparse mask var, counted without reading its values; ``None`` to let
coremltools count them."""


def internal(owner: Any, name: str, where: str) -> Any:
    """``owner.name``, or ``CoremltoolsInternalsError`` naming ``where.name`` when it is gone."""
    try:
        return getattr(owner, name)
    except AttributeError:
        raise CoremltoolsInternalsError(
            f"sdpa_slicer needs {where}.{name}, which coremltools {coremltools.__version__} does not have "
            f"(checked with coremltools {TESTED_VERSION}); install coremltools {TESTED_VERSION}"
        ) from None


def internal_module(path: str) -> Any:
    """The module at ``path``, or ``CoremltoolsInternalsError`` naming it."""
    try:
        return importlib.import_module(path)
    except ImportError:
        raise CoremltoolsInternalsError(
            f"sdpa_slicer needs the module {path}, which coremltools {coremltools.__version__} does not have "
            f"(checked with coremltools {TESTED_VERSION}); install coremltools {TESTED_VERSION}"
        ) from None


def ops_before(block: Block, op: Operation) -> Iterator[Operation]:
    """The ops of ``block`` before ``op``, nearest first (a block keeps its ops in a linked list)."""
    node = internal(block.operations, "_get_node_from_op", "coremltools' block op list")(op).prev
    while node is not None:
        yield node.op
        node = node.prev


def copy_scope_info(source: Var, target: Var) -> None:
    """Give ``target``'s op (and the ops it reads, not yet done) ``source``'s scope info."""
    internal(Block, "_copy_scope_info", "coremltools.converters.mil.mil.Block")(source, target)


def newest_opset_op(prog: Program) -> tuple[Any, Operation]:
    """The newest opset any op of ``prog`` needs, and one op that needs it."""
    return internal(prog, "_get_max_opset_version_and_op", "coremltools.converters.mil.mil.Program")()


def opset_op_types(opset: Any) -> tuple[str, ...]:
    """Every core op type coremltools can build at ``opset`` (a ``ct.target``), sorted."""
    registry_module = internal_module("coremltools.converters.mil.mil.ops.registry")
    registry = internal(registry_module, "SSAOpRegistry", "coremltools.converters.mil.mil.ops.registry")
    core_ops = internal(registry, "core_ops", "coremltools.converters.mil.mil.ops.registry.SSAOpRegistry")
    # Each op type maps the opsets that (re)define it to its class there.
    return tuple(sorted(op_type for op_type, versions in core_ops.items() if any(v <= opset for v in versions)))


def unpack_sub_byte(packed: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
    """``count`` values of ``nbits`` bits packed in ``packed`` (uint8), as coremltools stores them."""
    utils = internal_module("coremltools.optimize._utils")
    restore = internal(utils, "restore_elements_from_packed_bits", "coremltools.optimize._utils")
    return restore(packed, nbits, count, signed)


def blob_writer(path: str, truncate: bool) -> Any:
    """coremltools' writer of a weight file at ``path``, appending unless ``truncate``."""
    storage = internal_module("coremltools.libmilstoragepython")
    return internal(storage, "_BlobStorageWriter", "coremltools.libmilstoragepython")(path, truncate_file=truncate)


@contextlib.contextmanager
def milproto_loader_hooks(value: ValueHook, operation: OperationHook, mask_ones: MaskOnes) -> Iterator[None]:
    """While active, coremltools' milproto loader asks ``value`` for every value it loads and
    ``operation`` to build every op; the sparse ops check their mask's ones with ``mask_ones``
    (from iOS18) or by counting them by table (iOS16)."""
    where = "coremltools.converters.mil.frontend.milproto.load"
    load_value, load_operation = internal(milproto, "_load_value", where), internal(milproto, "_load_operation", where)
    sparse = _sparse_to_dense_op()
    check_sparse = internal(sparse, "_validate_sparse_inputs", "constexpr_sparse_to_dense (iOS18)")
    sparse_ios16 = _sparse_to_dense_op_ios16()
    infer_ios16 = internal(sparse_ios16, "type_inference", "constexpr_sparse_to_dense (iOS16)")

    def hooked_value(context: Any, value_spec: Any) -> Any:
        return value(load_value, context, value_spec)

    def hooked_operation(context: Any, op_spec: Any) -> None:
        operation(load_operation, context, op_spec)

    def hooked_check(nonzero_data: Var, mask: Var) -> None:
        ones = mask_ones(mask)
        if ones is None:
            check_sparse(nonzero_data, mask)
            return
        check_sparse(nonzero_data, _UNKNOWN_VALUE)  # the rank check, and no reading of the mask
        if ones != nonzero_data.shape[0]:
            raise AssertionError("Number of 1s in mask not match number of elements in parameter nonzero_data")

    with _LOADER_LOCK:
        milproto._load_value, milproto._load_operation = hooked_value, hooked_operation
        sparse._validate_sparse_inputs = staticmethod(hooked_check)
        sparse_ios16.type_inference = _sparse_ios16_type_inference
        try:
            yield
        finally:
            milproto._load_value, milproto._load_operation = load_value, load_operation
            sparse._validate_sparse_inputs = staticmethod(check_sparse)
            sparse_ios16.type_inference = infer_ios16


def set_bits(packed: np.ndarray, count: int) -> int:
    """The number of ones among the first ``count`` bits of ``packed`` (uint8), least significant
    bit of each byte first, as coremltools packs sub-byte values and masks."""
    whole, rest = divmod(count, 8)
    ones = int(_POPCOUNT[packed[:whole]].sum(dtype=np.int64))
    return ones + (int(_POPCOUNT[packed[whole] & ((1 << rest) - 1)]) if rest else 0)


_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)
"""The number of ones in each byte value."""


def _sparse_ios16_type_inference(op: Operation) -> Any:
    """The iOS16 ``constexpr_sparse_to_dense`` op's type inference, as coremltools 9.0 states it
    (every check, every message), with the mask's bits counted by table instead of one Python
    call per byte, which takes seconds per MiB of mask."""
    for name in ("nonzero_data", "mask"):
        if op.inputs[name].rank != 1:
            raise ValueError(f"Parameter {name} needs to have rank == 1")
    mask, shape = op.inputs["mask"].val, op.inputs["shape"].val
    if set_bits(mask, 8 * mask.shape[0]) != op.inputs["nonzero_data"].shape[0]:
        raise AssertionError(
            "Number of set bits in mask needs to be equal to number of elements in parameter nonzero_data"
        )
    output_size = int(np.prod(shape))
    if mask.shape[0] != np.ceil(output_size / 8.0):
        raise AssertionError("Constraint Violated: M = ceil( product(shape) / 8) where M = mask.size")
    if output_size % 8 and int(mask[-1]) >> (output_size % 8):
        raise AssertionError("Padded bits in mask should be unset or equals to zero")
    return types.tensor(op.inputs["nonzero_data"].dtype, shape)


def loaded_var(context: Any, name: str) -> Var:
    """The var the milproto loader's ``context`` has built under ``name``."""
    return internal(context, "get_var_from_name", "coremltools' milproto TranscriptionContext")(name)


class _UnknownValue:
    """A stand-in var whose value is not known at compile time."""

    val = None


_UNKNOWN_VALUE = _UnknownValue()


def _sparse_to_dense_op_ios16() -> Any:
    where = "coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops"
    return internal(internal_module(where), "constexpr_sparse_to_dense", where)


def _sparse_to_dense_op() -> Any:
    """The iOS18 ``constexpr_sparse_to_dense`` op class, whose check of a mask's ones the sparse ops share."""
    where = "coremltools.converters.mil.mil.ops.defs.iOS18.compression"
    return internal(internal_module(where), "constexpr_sparse_to_dense", where)


def read_when_asked(var: Var, read: Callable[[], np.ndarray], tag: object) -> None:
    """Make ``var.val`` (and, for a const op's output, the op's own ``val``) the result of
    ``read()``, called the first time something asks for it, then kept; ``tag`` stays with the
    value (``value_tag``) until something gives the var another value."""
    holders = [var]
    if var.op is not None and var.op.op_type == "const":
        holders.append(internal(var.op, "val", "coremltools' const op"))
    for holder in holders:
        sym_val = internal(holder, "_sym_val", "coremltools.converters.mil.mil.Var")
        holder._sym_val = _read_when_asked_class(type(sym_val))(read, tag)


def value_tag(var: Var) -> object:
    """The tag ``read_when_asked`` gave ``var``'s value, or ``None``."""
    sym_val = getattr(var, "_sym_val", None)
    return sym_val.tag if isinstance(sym_val, _ReadWhenAsked) else None


def value_was_read(var: Var) -> bool:
    """Whether ``var``'s value, given by ``read_when_asked``, has been read."""
    sym_val = getattr(var, "_sym_val", None)
    return not isinstance(sym_val, _ReadWhenAsked) or sym_val.was_read


class _ReadWhenAsked:
    """Mixed into the class of a var's value holder (a tensor type, or ``unknown``); keeps the
    value where tensor types keep theirs (``_val``)."""

    def __init__(self, read: Callable[[], np.ndarray], tag: object) -> None:
        self._read: Optional[Callable[[], np.ndarray]] = read
        self._val: Any = None
        self.tag = tag

    @property
    def was_read(self) -> bool:
        return self._read is None

    @property
    def val(self) -> Any:
        if self._read is not None:
            self._val, self._read = self._read(), None
        return self._val

    @val.setter
    def val(self, value: Any) -> None:
        self._read, self.tag = None, None
        holder_val = next((klass.__dict__["val"] for klass in type(self).__mro__[2:] if "val" in klass.__dict__), None)
        if isinstance(holder_val, property) and holder_val.fset is not None:
            holder_val.fset(self, value)  # a tensor type's checks and casts
        else:
            self._val = value


_READ_WHEN_ASKED_CLASSES: dict[type, type] = {}


def _read_when_asked_class(holder: type) -> type:
    found = _READ_WHEN_ASKED_CLASSES.get(holder)
    if found is None:
        found = _READ_WHEN_ASKED_CLASSES[holder] = type(holder.__name__, (_ReadWhenAsked, holder), {})
    return found


def load_milproto(
    program_spec: proto.MIL_pb2.Program, specification_version: int, weights_dir: str, function_names: Sequence[str]
) -> Program:
    """The program of ``program_spec`` by coremltools' milproto loader, the same from run to run.

    The loader alone is not: it loads the functions in protobuf map order, which changes from
    process to process, while the names it makes up (``coreml_update_state_0``) come from one
    counter per process; and it makes the constants of an op's value inputs in the map order of
    those inputs. Here the functions are loaded in the order ``function_names``, names are
    counted from zero for this load (the process's counter then continues past them), and an
    op's constants are made in the order its definition lists its inputs.
    """
    where = "coremltools.converters.mil.frontend.milproto.load"
    context_type = internal(milproto, "TranscriptionContext", where)
    load_function = internal(milproto, "_load_function", where)
    load_attributes = internal(milproto, "_load_program_spec_attributes", where)
    if program_spec.docString:
        raise NotImplementedError("Docstring would be lost in the process")
    if program_spec.version != 1:
        raise ValueError("Invalid program version")
    with _LOADER_LOCK, _names_counted_from_zero(), _constants_in_definition_order():
        context = context_type(weights_dir)
        prog = Program()
        for name in function_names:
            prog.add_function(name, load_function(context, program_spec.functions[name], specification_version))
        load_attributes(context, program_spec, prog)
    return prog


@contextlib.contextmanager
def _names_counted_from_zero() -> Iterator[None]:
    """While active, the names coremltools' builder makes up are counted from zero; afterwards the
    process's counter goes on from the larger of the two counts, so later names stay new."""
    counts = internal(Builder, "name_count", "coremltools.converters.mil.Builder")
    Builder.name_count = defaultdict(int)
    try:
        yield
    finally:
        fresh, Builder.name_count = Builder.name_count, counts
        for name, count in fresh.items():
            counts[name] = max(counts[name], count)


@contextlib.contextmanager
def _constants_in_definition_order() -> Iterator[None]:
    """While active, coremltools' builder makes the constants of an op's inputs in the order the op's
    definition lists them, not in the order the inputs were given."""
    internal(Builder, "_create_vars", "coremltools.converters.mil.Builder")
    create_vars = vars(Builder)["_create_vars"]
    bound = Builder._create_vars

    def ordered(input_spec: Any, op_name: str, before_op: Any, candidate_kv: dict[str, Any]) -> Any:
        position = {name: index for index, name in enumerate(input_spec.input_types)}
        ordered_kv = dict(sorted(candidate_kv.items(), key=lambda item: position.get(item[0], len(position))))
        return bound(input_spec=input_spec, op_name=op_name, before_op=before_op, candidate_kv=ordered_kv)

    Builder._create_vars = ordered
    try:
        yield
    finally:
        Builder._create_vars = create_vars


class _HookedExporter(mil_backend.MILProtoExporter):
    """coremltools' exporter, asking ``file_value`` how to store each value that goes to a file."""

    def __init__(
        self,
        prog: Program,
        weights_dir: str,
        specification_version: int,
        open_writer: Callable[[str], Any],
        file_value: Callable[[Var, Callable[[], int]], proto.MIL_pb2.Value],
        stored_value: Callable[[Var], Optional[proto.MIL_pb2.Value]],
    ) -> None:
        super().__init__(prog=prog, weights_dir=weights_dir, specification_version=specification_version)
        self._open_writer = open_writer
        self._file_value = file_value
        self._stored_value = stored_value

    def get_milproto_value(self, var: Var) -> proto.MIL_pb2.Value:
        stored = self._stored_value(var)  # before coremltools looks at the value, which would read it
        return super().get_milproto_value(var) if stored is None else stored

    def get_blob_writer(self, weight_path: str) -> Any:
        writers = internal(self, "blob_writers", "coremltools' MILProtoExporter")
        if weight_path not in writers:
            writers[weight_path] = self._open_writer(weight_path)
        return writers[weight_path]

    def create_file_value(self, var: Var) -> proto.MIL_pb2.Value:
        def write() -> int:
            path = internal(self, "get_weight_path", "coremltools' MILProtoExporter")(var.op)
            write_data = internal(
                mil_helper, "_get_offset_by_writing_data", "coremltools.converters.mil.backend.mil.helper"
            )
            return write_data(var, self.get_blob_writer(path))

        return self._file_value(var, write)


def export_program(
    prog: Program,
    weights_dir: str,
    specification_version: int,
    open_writer: Callable[[str], Any],
    file_value: Callable[[Var, Callable[[], int]], proto.MIL_pb2.Value],
    stored_value: Callable[[Var], Optional[proto.MIL_pb2.Value]] = lambda var: None,
) -> proto.MIL_pb2.Program:
    """``prog`` as a milproto program, by coremltools' exporter with no graph pass. A value for
    which ``stored_value(var)`` gives a milproto value is that value, its own never looked at.
    Each other value that goes to a weight file is ``file_value(var, write)``, where ``write()``
    appends the value to the weight file and returns its offset; ``open_writer(path)`` opens that
    file's writer."""
    for hook in ("get_blob_writer", "create_file_value", "get_milproto_value"):
        internal(mil_backend.MILProtoExporter, hook, "coremltools' MILProtoExporter")
    exporter = _HookedExporter(prog, weights_dir, specification_version, open_writer, file_value, stored_value)
    return exporter.export()
