"""``sdpa_slicer::slice_attention`` as a coremltools graph pass, and a pipeline that runs it.

>>> import coremltools as ct
>>> import sdpa_slicer
>>> pipeline = sdpa_slicer.pass_pipeline(num_chunks=8)
>>> PASS_NAME in pipeline.passes
True
>>> [str(option) for option in pipeline.get_options(PASS_NAME)]
['num_chunks: 8']
"""

from __future__ import annotations

from typing import Any, Optional

import coremltools as ct
from coremltools.converters.mil.mil import Program
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass, PassOption
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

from sdpa_slicer._rewrite.config import SliceConfig
from sdpa_slicer._rewrite.pipeline import PASS_NAME, slice_attention

NAMESPACE, _, CLASS_NAME = PASS_NAME.partition("::")
INSERT_BEFORE = "common::canonicalize_inplace_pattern"
"""The default pipeline's first state pass: by then fp16 casts and fusions have settled."""


class SliceAttentionPass(AbstractGraphPass):
    """Rewrite every static-query attention site to work on query chunks (see ``slice_attention``).

    Options are the ``SliceConfig`` fields; values may be text, as ``PassPipeline.set_options``
    passes them (``{"num_chunks": "2", "max_scores_bytes": "8MiB"}``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.config = SliceConfig()

    def set_options(self, pass_options: Optional[list[PassOption]] = None) -> None:
        options = {option.option_name: option.option_val for option in pass_options or ()}
        self.config = SliceConfig.from_text_options(options)

    def apply(self, prog: Program) -> None:
        slice_attention(prog, self.config)

    def __str__(self) -> str:
        return PASS_NAME


def register() -> None:
    """Make ``sdpa_slicer::slice_attention`` known to coremltools' pass registry (idempotent)."""
    if PASS_NAME not in PASS_REGISTRY:
        register_pass(namespace=NAMESPACE, name=CLASS_NAME)(SliceAttentionPass)


def pass_pipeline(base: Optional[ct.PassPipeline] = None, **config: Any) -> ct.PassPipeline:
    """``base`` (default: coremltools' default pipeline) with ``sdpa_slicer::slice_attention`` added.

    The pass goes where the default pipeline starts inserting state ops, after fusions and
    fp16 casts have settled, so it sees attention in its final dtype; in a pipeline without
    that pass, it goes last. ``config`` are ``SliceConfig`` fields, validated here.
    """
    SliceConfig().with_options(**config)
    register()
    pipeline = ct.PassPipeline.DEFAULT if base is None else ct.PassPipeline(list(base.passes), base.pipeline_name)
    if base is not None:
        pipeline.set_options_by_another_pipeline(base)
    passes = [name for name in pipeline.passes if name != PASS_NAME]
    index = passes.index(INSERT_BEFORE) if INSERT_BEFORE in passes else len(passes)
    passes.insert(index, PASS_NAME)
    pipeline.passes = passes
    if config:
        pipeline.set_options(PASS_NAME, config)
    return pipeline
