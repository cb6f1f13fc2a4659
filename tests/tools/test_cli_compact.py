"""``sdpa-slicer slice`` says how many bytes of weights no op refers to any more, and ``--compact``
leaves them out."""

from __future__ import annotations

from pathlib import Path

import pytest

from packages import MASK, masked_package
from sdpa_slicer._mlpackage.package import weight_usage
from sdpa_slicer._text import format_bytes
from sdpa_slicer._tools.cli import main


@pytest.mark.parametrize("compact", [False, True], ids=["default", "compact"])
def test_slice_counts_the_weights_left_behind_unless_compact(
    compact: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = masked_package(tmp_path / "masked.mlpackage")
    output = tmp_path / "sliced.mlpackage"
    argv = ["slice", str(source), "-o", str(output), "--num-chunks", "2", "--keep-masked-keys"]
    assert main(argv + (["--compact"] if compact else [])) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    usage = weight_usage(output)
    if compact:
        assert last.startswith(f"wrote {output} (") and usage.unreferenced_bytes == 0
    else:
        assert usage.unreferenced_bytes == 64 + MASK.nbytes
        assert last == (
            f"{format_bytes(64 + MASK.nbytes)} of weights (1 blob) no op refers to any more stay in the weight file; "
            "--compact leaves them out"
        )
