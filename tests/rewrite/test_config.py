"""SliceConfig: defaults, validation naming the field, overrides and text options."""

from __future__ import annotations

import numpy as np
import pytest

from sdpa_slicer import SliceConfig
from sdpa_slicer._rewrite.config import DEFAULT_MAX_SCORES_BYTES, parse_size


def test_defaults_follow_the_documented_policy():
    config = SliceConfig()
    assert (config.min_seq_length, config.max_scores_bytes) == (64, 16 * 1024 * 1024)
    assert config.chunk_size is None and config.num_chunks is None


@pytest.mark.parametrize("field", ["min_seq_length", "max_scores_bytes", "chunk_size", "num_chunks"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SliceConfig.{field} must be >= 1"):
        SliceConfig(**{field: value})


@pytest.mark.parametrize("field", ["min_seq_length", "max_scores_bytes", "chunk_size", "num_chunks"])
@pytest.mark.parametrize("value", [2.0, "8", True])
def test_non_integers_are_rejected_naming_the_field(field, value):
    if field == "max_scores_bytes" and isinstance(value, str):
        pytest.skip("a size as text is a size (below)")
    with pytest.raises(TypeError, match=f"SliceConfig.{field} must be an int"):
        SliceConfig(**{field: value})


def test_numpy_integers_are_accepted_as_ints():
    config = SliceConfig(num_chunks=np.int64(4))
    assert config.num_chunks == 4 and type(config.num_chunks) is int


def test_explicit_chunk_options_are_mutually_exclusive():
    with pytest.raises(ValueError, match="chunk_size and SliceConfig.num_chunks are mutually exclusive"):
        SliceConfig(chunk_size=8, num_chunks=2)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        SliceConfig().num_chunks = 3  # type: ignore[misc]


def test_unknown_option_is_rejected_naming_it():
    with pytest.raises(TypeError, match="unknown SliceConfig option.*num_chunk\\b"):
        SliceConfig().with_options(num_chunk=3)


def test_an_explicit_override_replaces_the_other_explicit_policy():
    assert SliceConfig(num_chunks=4).with_options(chunk_size=32) == SliceConfig(chunk_size=32)
    assert SliceConfig(chunk_size=32).with_options(num_chunks=4) == SliceConfig(num_chunks=4)


def test_text_options_are_parsed_like_pass_options():
    config = SliceConfig.from_text_options({"num_chunks": "2", "min_seq_length": " 16 ", "max_scores_bytes": "1 MiB"})
    assert config == SliceConfig(num_chunks=2, min_seq_length=16, max_scores_bytes=1024 * 1024)
    assert SliceConfig.from_text_options({"chunk_size": "none"}).chunk_size is None


@pytest.mark.parametrize(
    "options, error",
    [
        ({"num_chunks": "two"}, ValueError),
        ({"num_chunks": "0"}, ValueError),
        ({"max_scores_bytes": "16 parsecs"}, ValueError),
        ({"chunks": "2"}, TypeError),
    ],
)
def test_bad_text_options_are_rejected(options, error):
    with pytest.raises(error):
        SliceConfig.from_text_options(options)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16MiB", DEFAULT_MAX_SCORES_BYTES),
        ("512 KB", 512_000),
        ("1048576", 1 << 20),
        ("1.5kib", 1536),
        ("2GiB", 2 << 30),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["16MiB", "512 KB", "1048576", "2GiB"])
def test_max_scores_bytes_takes_the_sizes_the_command_line_takes(text):
    """Found by a user: ``--max-scores-bytes 16MiB`` worked, ``max_scores_bytes="16MiB"`` raised TypeError."""
    expected = SliceConfig.from_text_options({"max_scores_bytes": text}).max_scores_bytes
    assert SliceConfig(max_scores_bytes=text).max_scores_bytes == expected == parse_size(text)
    assert SliceConfig().with_options(max_scores_bytes=text).max_scores_bytes == expected


def test_a_bad_size_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match=r"SliceConfig.max_scores_bytes: not a byte size: 'lots'"):
        SliceConfig(max_scores_bytes="lots")
