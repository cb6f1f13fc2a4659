"""``SliceConfig``: what to rewrite and how finely, validated before any program is touched."""

from __future__ import annotations

import numbers
import re
from typing import Any, Mapping, Optional

import attrs

MIB = 1024 * 1024
DEFAULT_MAX_SCORES_BYTES = 16 * MIB

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None and attribute.default is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"SliceConfig.{attribute.name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"SliceConfig.{attribute.name} must be >= 1, got {value}")


def _bool(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"SliceConfig.{attribute.name} must be a bool, got {type(value).__name__} {value!r}")


def _int_or_none(value: Any) -> Any:
    """Normalise NumPy integers to ``int``; anything else is left for the validator to judge."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _size_or_none(value: Any) -> Any:
    """A byte size given as text (``"16MiB"``, as on the command line) as its ``int``; otherwise as
    ``_int_or_none``."""
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as error:
            raise ValueError(f"SliceConfig.max_scores_bytes: {error}") from None
    return _int_or_none(value)


@attrs.frozen(kw_only=True)
class SliceConfig:
    """How ``slice_attention`` chooses and chunks attention sites.

    The query chunks of a site come from exactly one policy: ``chunk_size`` (query rows
    per chunk), ``num_chunks`` (split L into this many near-equal chunks), or by default
    the fewest chunks whose scores tensor (batch dims x chunk rows x S x itemsize) fits in
    ``max_scores_bytes``, switching to key chunks below ``min_query_chunk`` rows.

    >>> SliceConfig(num_chunks=4).num_chunks
    4
    >>> SliceConfig(num_chunks=4, chunk_size=32)
    Traceback (most recent call last):
    ...
    ValueError: SliceConfig.chunk_size and SliceConfig.num_chunks are mutually exclusive; give one
    """

    min_seq_length: int = attrs.field(default=64, converter=_int_or_none, validator=_positive_int)
    max_scores_bytes: int = attrs.field(
        default=DEFAULT_MAX_SCORES_BYTES, converter=_size_or_none, validator=_positive_int
    )
    """Also a size as text, as the command line takes it: ``"16MiB"``, ``"512KB"``, ``"1048576"``."""
    chunk_size: Optional[int] = attrs.field(default=None, converter=_int_or_none, validator=_positive_int)
    num_chunks: Optional[int] = attrs.field(default=None, converter=_int_or_none, validator=_positive_int)
    kv_chunk_size: Optional[int] = attrs.field(default=None, converter=_int_or_none, validator=_positive_int)
    """Also walk the keys of each query chunk in chunks of this many, with an online softmax."""
    min_query_chunk: int = attrs.field(default=16, converter=_int_or_none, validator=_positive_int)
    """Under the ``max_scores_bytes`` policy, query chunks never get smaller than this: key
    chunking takes over instead (when the key length is static)."""
    prune_masked_keys: bool = attrs.field(default=True, validator=_bool)
    """With a constant mask, give each query chunk only the key range its rows can see."""
    match_decomposed: bool = attrs.field(default=True, validator=_bool)
    """Also rewrite attention written out as matmul -> [scale] -> [add mask] -> softmax -> matmul."""
    fold_repeated_kv: bool = attrs.field(default=True, validator=_bool)
    """Read keys and values whose heads are a repeat of fewer heads (grouped-query attention)
    un-repeated, with the query heads of each KV head grouped; also at sites too short to chunk."""
    decompose_unchunked: bool = attrs.field(default=True, validator=_bool)
    """Write a fused attention op out as ops even when it is planned as one chunk over every key
    (its scores fit): the fused op itself is suspected on device. Off, such an op stays fused
    (unless its keys and values are folded, which is a change of its own)."""

    def __attrs_post_init__(self) -> None:
        if self.chunk_size is not None and self.num_chunks is not None:
            raise ValueError("SliceConfig.chunk_size and SliceConfig.num_chunks are mutually exclusive; give one")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in attrs.fields(cls))

    def with_options(self, **options: Any) -> SliceConfig:
        """A copy with ``options`` replaced.

        Giving one of ``chunk_size``/``num_chunks`` clears the other, so an override
        always wins over the policy of the base config.
        """
        _check_option_names(options)
        if "chunk_size" in options and options["chunk_size"] is not None and "num_chunks" not in options:
            options["num_chunks"] = None
        if "num_chunks" in options and options["num_chunks"] is not None and "chunk_size" not in options:
            options["chunk_size"] = None
        return attrs.evolve(self, **options)

    @classmethod
    def from_text_options(cls, options: Mapping[str, Any], base: Optional[SliceConfig] = None) -> SliceConfig:
        """Build a config from option values that may be text, as coremltools pass options are.

        >>> SliceConfig.from_text_options({"num_chunks": "2", "max_scores_bytes": "8MiB"}).max_scores_bytes
        8388608
        """
        base = cls() if base is None else base
        _check_option_names(options)
        parsed = {name: _parse_text_option(name, value) for name, value in options.items()}
        return base.with_options(**parsed)


def _check_option_names(options: Mapping[str, Any]) -> None:
    known = SliceConfig.field_names()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown SliceConfig option(s) {', '.join(unknown)}; known options: {', '.join(known)}")


def parse_size(text: str) -> int:
    """Parse a byte count such as ``"16MiB"``, ``"512 KB"`` or ``"1048576"``.

    >>> parse_size("16MiB")
    16777216
    """
    match = _SIZE_PATTERN.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a byte size: {text!r} (examples: 16MiB, 512KB, 1048576)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _parse_text_option(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() == "none":
        return None
    if name == "max_scores_bytes":
        return parse_size(text)
    field_type = {field.name: field.type for field in attrs.fields(SliceConfig)}.get(name)
    if field_type == "bool":
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
        raise ValueError(f"SliceConfig.{name} must be true or false, got {value!r}")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"SliceConfig.{name} must be an integer, got {value!r}") from None
