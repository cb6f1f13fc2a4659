"""Every private coremltools internal sdpa_slicer uses: each works as relied on, and when it moves,
its function says which internal and which coremltools version, in one line."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import coremltools
import coremltools as ct
import numpy as np
import pytest
from coremltools import proto
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.backend.mil import helper as mil_helper
from coremltools.converters.mil.backend.mil import load as mil_backend
from coremltools.converters.mil.frontend.milproto import load as milproto
from coremltools.converters.mil.mil import Block, Program, types
from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource
from coremltools.converters.mil.mil.utils import CacheDoublyLinkedList

from attention_cases import IOS18
from packages import FUNCTIONS, WEIGHT_FILE, model_spec
from sdpa_slicer import _coreml_compat as compat
from sdpa_slicer._errors import CoremltoolsInternalsError
from sdpa_slicer._mlpackage.blobs import BlobFile

PACKED_CODES = np.array([0b11100100, 0b00011011], dtype=np.uint8)
"""Eight 2-bit codes, least significant first: 0, 1, 2, 3, then 3, 2, 1, 0."""


def _program() -> Program:
    @mb.program(input_specs=[mb.TensorSpec((2, 3))], opset_version=IOS18)
    def prog(x):
        first = mb.relu(x=x, name="first")
        second = mb.sin(x=first, name="second")
        return mb.cos(x=second, name="third")

    return prog


def _ops(prog: Program) -> dict[str, Any]:
    return {op.name: op for op in prog.functions["main"].operations}


PROGRAM = _program()


def test_ops_before_walks_back_from_an_op_to_the_first():
    prog = _program()
    ops = _ops(prog)
    assert [op.name for op in compat.ops_before(prog.functions["main"], ops["third"])] == ["second", "first"]
    assert list(compat.ops_before(prog.functions["main"], ops["first"])) == []


def test_copy_scope_info_gives_a_new_op_the_scopes_of_the_var_it_replaces():
    with mb.scope(ScopeInfo(source=ScopeSource.TORCHSCRIPT_MODULE_TYPE, data=["Attention"])):
        prog = _program()
    main = prog.functions["main"]
    third = _ops(prog)["third"]
    with main, mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=["a_pass"])):
        new = mb.tanh(x=third.inputs["x"], before_op=third, name="new")
        compat.copy_scope_info(third.outputs[0], new)
    assert new.op.scopes[ScopeSource.TORCHSCRIPT_MODULE_TYPE] == ["Attention"]


def test_newest_opset_op_names_the_opset_and_an_op_that_needs_it():
    @mb.program(input_specs=[mb.TensorSpec((1, 2, 4, 8)) for _ in range(3)], opset_version=IOS18)
    def prog(q, k, v):
        return mb.scaled_dot_product_attention(query=q, key=k, value=v, name="attention")

    opset, op = compat.newest_opset_op(prog)
    assert (opset, op.name) == (IOS18, "attention")


def test_opset_op_types_list_the_ops_an_opset_can_build():
    ios17, ios18 = compat.opset_op_types(ct.target.iOS17), compat.opset_op_types(ct.target.iOS18)
    assert {"conv", "matmul", "softmax"} <= set(ios17)
    assert set(ios18) - set(ios17) >= {"scaled_dot_product_attention", "slice_update", "read_state"}
    assert list(ios18) == sorted(ios18)


def test_unpack_sub_byte_reads_codes_from_the_least_significant_bit_up():
    unpacked = compat.unpack_sub_byte(PACKED_CODES, 2, 8, signed=False)
    np.testing.assert_array_equal(unpacked, [0, 1, 2, 3, 3, 2, 1, 0])


def test_blob_writer_writes_a_weight_file_that_can_be_read_back(tmp_path: Path):
    path = tmp_path / "weight.bin"
    values = np.arange(16, dtype=np.float16)
    offset = compat.blob_writer(str(path), truncate=True).write_fp16_data(values.view(np.uint16))
    blob_file = BlobFile(path)
    record = blob_file.record(offset)
    np.testing.assert_array_equal(blob_file.data(record, np.dtype(np.float16)), values)


def test_milproto_loader_hooks_see_every_value_and_op_then_leave(single_package: Path):
    spec = model_spec(single_package)
    seen: list[str] = []
    built = [0]

    def value(load: Callable[[Any, Any], Any], context: Any, value_spec: Any) -> Any:
        seen.append(value_spec.WhichOneof("value"))
        return load(context, value_spec)

    def operation(load: Callable[[Any, Any], None], context: Any, op_spec: Any) -> None:
        load(context, op_spec)
        built[0] += 1

    loaded_value, loaded_operation = milproto._load_value, milproto._load_operation
    with compat.milproto_loader_hooks(value, operation, lambda mask: None):
        prog = milproto.load(spec, spec.specificationVersion, str(single_package / WEIGHT_FILE.parent))
    assert (milproto._load_value, milproto._load_operation) == (loaded_value, loaded_operation)
    blocks = spec.mlProgram.functions["main"].block_specializations.values()
    assert built[0] == sum(len(block.operations) for block in blocks) > 0
    assert "main" in prog.functions
    assert "blobFileValue" in seen


@pytest.mark.parametrize("order", [FUNCTIONS, FUNCTIONS[::-1]], ids=["in order", "reversed"])
def test_load_milproto_loads_the_functions_in_the_order_given_naming_from_zero(multi_package: Path, order: Any):
    spec = model_spec(multi_package)

    def load() -> Program:
        return compat.load_milproto(
            spec.mlProgram, spec.specificationVersion, str(multi_package / WEIGHT_FILE.parent), order
        )

    first, second = load(), load()  # the first load moves the process's counter of made-up names on
    assert tuple(first.functions) == tuple(order)
    assert _op_names(first) == _op_names(second)
    assert {name for name in _op_names(first) if name.startswith("query_weight_data")} == {
        "query_weight_data_0",
        "query_weight_data_1",
    }


def _op_names(prog: Program) -> list[str]:
    return [op.name for function in prog.functions.values() for op in function.operations]


def test_export_program_asks_how_each_file_value_is_stored(tmp_path: Path):
    weight = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)

    @mb.program(input_specs=[mb.TensorSpec((1, 8))], opset_version=IOS18)
    def prog(x):
        return mb.linear(x=x, weight=weight, name="projected")

    asked = []

    def file_value(var: Any, write: Callable[[], int]) -> Any:
        asked.append(var.name)
        data_type = mil_helper.types_to_proto_primitive(types.fp32)
        return mil_helper.create_file_value_tensor("@model_path/weights/weight.bin", write(), var.shape, data_type)

    def open_writer(path: str) -> Any:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return compat.blob_writer(path, truncate=True)

    exported = compat.export_program(prog, str(tmp_path / "weights"), 8, open_writer, file_value)
    assert len(asked) == 1 and "main" in exported.functions
    (tmp_path / "weights" / "weight.bin").stat()


def test_set_bits_counts_the_first_bits_least_significant_first():
    packed = np.array([0b11110001, 0b10000011], dtype=np.uint8)
    assert [compat.set_bits(packed, count) for count in (0, 1, 4, 8, 9, 10, 15, 16)] == [0, 1, 1, 5, 6, 7, 7, 8]


IOS16_MASK = np.array([0b00001011], dtype=np.uint8)
"""Elements 0, 1 and 3 of 5 kept."""


@pytest.mark.parametrize(
    "mask, nonzero, error",
    [
        (IOS16_MASK, 3, None),
        (IOS16_MASK, 2, "Number of set bits in mask"),
        (np.array([0b00101011], dtype=np.uint8), 4, "Padded bits in mask"),
        (np.array([0b1011, 0], dtype=np.uint8), 3, "M = ceil"),
    ],
)
def test_the_loader_checks_an_ios16_sparse_mask_as_coremltools_does(mask: np.ndarray, nonzero: int, error: Any):
    def build() -> Any:
        @mb.program(input_specs=[mb.TensorSpec((5,))], opset_version=ct.target.iOS16)
        def prog(x):
            dense = mb.constexpr_sparse_to_dense(
                nonzero_data=np.ones(nonzero, dtype=np.float32), mask=mask, shape=np.array([5], dtype=np.uint32)
            )
            return mb.add(x=x, y=dense)

        return prog

    outcomes = []
    for hooked in (False, True):
        hooks = compat.milproto_loader_hooks(lambda *args: None, lambda *args: None, lambda var: None)
        with hooks if hooked else contextlib.nullcontext():
            try:
                build()
                outcomes.append(None)
            except (AssertionError, ValueError) as raised:
                outcomes.append(str(raised))
    assert outcomes[0] == outcomes[1]  # coremltools' own check, then the loader's
    assert (error is None) == (outcomes[1] is None) and (error is None or error in outcomes[1])


class _Context:
    """Stands in for the milproto loader's context."""

    def get_var_from_name(self, name: str) -> str:
        return name


def test_export_program_takes_a_stored_value_as_given_without_looking_at_it(tmp_path: Path):
    weight = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)

    @mb.program(input_specs=[mb.TensorSpec((1, 8))], opset_version=IOS18)
    def prog(x):
        return mb.linear(x=x, weight=weight, name="projected")

    data_type = mil_helper.types_to_proto_primitive(types.fp32)
    stored = mil_helper.create_file_value_tensor("@model_path/weights/weight.bin", 4096, (8, 8), data_type)

    def stored_value(var: Any) -> Any:
        return stored if var.shape == weight.shape else None

    exported = compat.export_program(
        prog, str(tmp_path), 8, lambda path: None, lambda var, write: pytest.fail("asked"), stored_value
    )
    (block,) = exported.functions["main"].block_specializations.values()
    (const,) = [op for op in block.operations if op.type == "const" and op.attributes["val"].HasField("blobFileValue")]
    assert const.attributes["val"] == stored


def _const_var() -> Any:
    @mb.program(input_specs=[mb.TensorSpec((1, 4))], opset_version=IOS18)
    def prog(x):
        return mb.add(x=x, y=np.zeros(4, dtype=np.float32), name="y")

    (const,) = [op for op in prog.functions["main"].operations if op.op_type == "const"]
    return const.outputs[0]


def test_read_when_asked_reads_the_value_once_when_asked():
    var, reads = _const_var(), []
    value = np.arange(4, dtype=np.float32)

    def read() -> np.ndarray:
        reads.append(1)
        return value

    compat.read_when_asked(var, read, "stored here")
    assert not reads and not compat.value_was_read(var) and compat.value_tag(var) == "stored here"
    assert var.val is value and var.op.val.val is value and var.sym_val is value
    assert len(reads) == 2  # the output and the const op's own value, once each
    assert compat.value_was_read(var)


def test_a_value_set_afterwards_drops_the_tag_and_keeps_the_tensor_types_cast():
    var = _const_var()
    compat.read_when_asked(var, lambda: np.zeros(4, dtype=np.float32), "stored here")
    var._sym_val.val = np.ones(4, dtype=np.float64)  # as a coremltools pass would set it
    assert compat.value_tag(var) is None
    assert var.val.dtype == np.float32 and list(var.val) == [1, 1, 1, 1]
    assert compat.value_tag(_const_var()) is None and compat.value_was_read(_const_var())


@pytest.mark.parametrize("ones, fails", [(3, False), (2, True), (None, False)])
def test_the_loader_hooks_count_a_sparse_masks_ones_as_told(ones: Any, fails: bool):
    mask = np.array([1, 0, 1, 1], dtype=types.nptype_from_builtin(types.uint1))

    def build() -> None:
        @mb.program(input_specs=[mb.TensorSpec((1, 4))], opset_version=IOS18)
        def prog(x):
            dense = mb.constexpr_sparse_to_dense(nonzero_data=np.ones(3, dtype=np.float32), mask=mask)
            return mb.add(x=x, y=dense)

    with compat.milproto_loader_hooks(lambda *args: None, lambda *args: None, lambda var: ones):
        if fails:
            with pytest.raises(AssertionError, match="Number of 1s in mask"):
                build()
        else:
            build()


INTERNALS: dict[str, tuple[Any, str, Callable[[], Any]]] = {
    "ops_before": (
        CacheDoublyLinkedList,
        "_get_node_from_op",
        lambda: list(compat.ops_before(PROGRAM.functions["main"], _ops(PROGRAM)["first"])),
    ),
    "copy_scope_info": (Block, "_copy_scope_info", lambda: compat.copy_scope_info(None, None)),
    "newest_opset_op": (Program, "_get_max_opset_version_and_op", lambda: compat.newest_opset_op(PROGRAM)),
    "opset_op_types": (
        compat.internal_module("coremltools.converters.mil.mil.ops.registry").SSAOpRegistry,
        "core_ops",
        lambda: compat.opset_op_types(IOS18),
    ),
    "unpack_sub_byte": (
        compat.internal_module("coremltools.optimize._utils"),
        "restore_elements_from_packed_bits",
        lambda: compat.unpack_sub_byte(PACKED_CODES, 2, 8, False),
    ),
    "blob_writer": (
        compat.internal_module("coremltools.libmilstoragepython"),
        "_BlobStorageWriter",
        lambda: compat.blob_writer("/nonexistent/weight.bin", truncate=True),
    ),
    "milproto_loader_hooks": (
        milproto,
        "_load_value",
        lambda: compat.milproto_loader_hooks(lambda *args: None, lambda *args: None, lambda mask: None).__enter__(),
    ),
    "milproto_loader_hooks (sparse masks)": (
        compat.internal_module("coremltools.converters.mil.mil.ops.defs.iOS18.compression").constexpr_sparse_to_dense,
        "_validate_sparse_inputs",
        lambda: compat.milproto_loader_hooks(lambda *args: None, lambda *args: None, lambda mask: None).__enter__(),
    ),
    "milproto_loader_hooks (iOS16 sparse masks)": (
        compat.internal_module("coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops"),
        "constexpr_sparse_to_dense",
        lambda: compat.milproto_loader_hooks(lambda *args: None, lambda *args: None, lambda mask: None).__enter__(),
    ),
    "loaded_var": (_Context, "get_var_from_name", lambda: compat.loaded_var(_Context(), "x")),
    "load_milproto": (
        milproto,
        "_load_function",
        lambda: compat.load_milproto(proto.MIL_pb2.Program(version=1), 8, "", ()),
    ),
    "export_program": (
        mil_backend.MILProtoExporter,
        "create_file_value",
        lambda: compat.export_program(PROGRAM, "/nonexistent", 8, lambda path: None, lambda var, write: None),
    ),
}
"""Per function: where its internal lives, the internal's name, and a call of the function."""


@pytest.mark.parametrize("function", INTERNALS)
def test_a_moved_internal_is_named_with_the_coremltools_version(function: str, monkeypatch: pytest.MonkeyPatch):
    owner, name, call = INTERNALS[function]
    monkeypatch.delattr(owner, name)
    with pytest.raises(CoremltoolsInternalsError) as raised:
        call()
    message = str(raised.value)
    assert name in message and f"coremltools {coremltools.__version__}" in message
    assert f"coremltools {compat.TESTED_VERSION}" in message and "\n" not in message
