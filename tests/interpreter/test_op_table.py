"""The table of docs/numerics.md lists every op type of the iOS18 opset and what runs it, as
``scripts/op_table.py`` generates it from the kernel registry."""

from __future__ import annotations

import op_table


def test_the_numerics_page_holds_the_generated_table():
    assert op_table.page_table(op_table.PAGE.read_text()) == op_table.render(), (
        "docs/numerics.md's op table is out of date: run python scripts/op_table.py --write"
    )


def test_the_table_names_every_op_type_once_with_its_kernel_module_or_none():
    rows = dict(op_table.rows())
    assert len(rows) == len(op_table.rows())
    assert rows["`conv`"] == "`kernels/conv.py`"
    assert rows["`scaled_dot_product_attention`"] == "`kernels/attention.py`"
    assert rows["`cond`"] == "the engine (blocks)"
    assert rows["`random_normal`"].startswith("no kernel")
