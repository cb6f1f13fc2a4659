"""``slice_attention``: walk -> match -> plan -> emit -> report, over a whole program."""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterator, Optional, Sequence

from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Program
from coremltools.converters.mil.mil.scope import SCOPE_STACK, ScopeInfo, ScopeSource

from sdpa_slicer._errors import EmitError, contained_bug
from sdpa_slicer._graph import check_program, dtype_name, report_shape
from sdpa_slicer._memory import estimate_memory
from sdpa_slicer._rewrite.config import SliceConfig
from sdpa_slicer._rewrite.emit.site import BlockRewriter
from sdpa_slicer._rewrite.emit.static_slices import give_static_slice_lengths
from sdpa_slicer._rewrite.emit.transaction import NameAllocator
from sdpa_slicer._rewrite.find import find_sites
from sdpa_slicer._rewrite.folds import FOLDS
from sdpa_slicer._rewrite.patterns import PATTERNS
from sdpa_slicer._rewrite.plan.geometry import SiteGeometry
from sdpa_slicer._rewrite.plan.planning import Plan, SitePlan, Skip, plan_site
from sdpa_slicer._rewrite.report import NearMissReport, SiteReport, SliceReport
from sdpa_slicer._rewrite.sites import AttentionSite, NearMiss
from sdpa_slicer._rewrite.sliced import SlicedAttention, sliced_attentions, sliced_note
from sdpa_slicer._rewrite.walk import walk_blocks

PASS_NAME = "sdpa_slicer::slice_attention"


def slice_attention(
    prog: Program, config: Optional[SliceConfig] = None, *, strict: bool = False, **options: Any
) -> SliceReport:
    """Rewrite every static-query attention site of ``prog`` in place to work on query chunks.

    Each ``scaled_dot_product_attention`` op whose query length L is static and at
    least ``min_seq_length`` becomes split -> matmul -> add mask -> softmax -> matmul
    per chunk of query rows, joined by one concat; its output keeps its name and uses.
    Sites that cannot be rewritten are left exactly as they were and reported as
    skipped, with the reason.

    ``options`` override fields of ``config`` (default ``SliceConfig()``). With
    ``strict=True`` a site that fails to rewrite raises ``EmitError`` instead of being
    skipped; the sites rewritten before it stay rewritten.

    >>> import numpy as np
    >>> import coremltools as ct
    >>> from coremltools.converters.mil import Builder as mb
    >>> shape = (1, 8, 256, 64)
    >>> @mb.program(input_specs=[mb.TensorSpec(shape) for _ in range(3)], opset_version=ct.target.iOS18)
    ... def prog(q, k, v):
    ...     return mb.scaled_dot_product_attention(query=q, key=k, value=v)
    >>> report = slice_attention(prog, num_chunks=4)
    >>> report.num_rewritten, report.sites[0].chunk_size
    (1, 64)
    >>> sorted({op.op_type for op in prog.functions["main"].operations} - {"const"})
    ['concat', 'matmul', 'mul', 'softmax', 'split']
    """
    check_program(prog, "slice_attention")
    config = resolve_config(config, options)
    with _cyclic_gc_paused():
        return _slice_program(prog, config, strict)


def _slice_program(prog: Program, config: SliceConfig, strict: bool) -> SliceReport:
    with _graph_pass_scope():
        static_notes = give_static_slice_lengths(prog)
    memory_before = tuple(estimate_memory(prog, name) for name in prog.functions)
    reports: list[SiteReport] = []
    near_misses: list[NearMissReport] = []
    functions_with_sites: set[str] = set()
    names_by_function: dict[str, NameAllocator] = {}
    sliced: dict[str, list[SlicedAttention]] = {}
    with _graph_pass_scope():
        for visit in walk_blocks(prog):
            found = find_sites(visit.ops, config, PATTERNS, FOLDS, strict)
            near_misses += [_near_miss_report(visit.function_name, miss) for miss in found.near_misses]
            sites = _not_sliced_yet(found.sites, visit.function_name, sliced)
            if found.sites:
                functions_with_sites.add(visit.function_name)
            if not sites:
                continue
            planned = [(site, *_planned(site, config, strict)) for site in sites]
            if any(isinstance(plan, SitePlan) for *_, plan in planned):
                names = names_by_function.get(visit.function_name)
                if names is None:
                    names = NameAllocator.for_function(prog.functions[visit.function_name])
                    names_by_function[visit.function_name] = names
                with visit.block:
                    rewriter = BlockRewriter(visit.block, names)
                    for index, (site, geometry, plan) in enumerate(planned):
                        if not isinstance(plan, SitePlan):
                            continue
                        try:
                            rewriter.rewrite(site, plan)
                        except EmitError as error:
                            if strict:
                                raise
                            planned[index] = (site, geometry, plan.skipped(str(error)))
            reports += [_site_report(visit.function_name, *entry) for entry in planned]
    memory_after = tuple(estimate_memory(prog, name) for name in prog.functions)
    return SliceReport(
        tuple(reports),
        static_notes + _sliced_notes(sliced) + _program_notes(prog, functions_with_sites),
        memory_before,
        memory_after,
        tuple(near_misses),
    )


def _not_sliced_yet(
    sites: Sequence[AttentionSite], function: str, sliced: dict[str, list[SlicedAttention]]
) -> list[AttentionSite]:
    """``sites`` but the chunks of attention already sliced, which are recorded in ``sliced``."""
    found = sliced_attentions(sites)
    if found:
        sliced.setdefault(function, []).extend(found)
    chunks = {chunk for attention in found for chunk in attention.chunks}
    return [site for site in sites if site not in chunks]


def _sliced_notes(sliced: dict[str, list[SlicedAttention]]) -> tuple[str, ...]:
    if not sliced:
        return ()
    attentions = [attention for found in sliced.values() for attention in found]
    return (sliced_note(sum(len(attention.chunks) for attention in attentions), len(attentions), list(sliced)),)


def _planned(site: AttentionSite, config: SliceConfig, strict: bool) -> tuple[Optional[SiteGeometry], Plan]:
    try:
        geometry = site.geometry()
        return geometry, plan_site(geometry, config)
    except Exception as error:  # a bug, contained: the site is left as it was
        where = f"could not plan {site.anchor.op_type} '{site.anchor.name}'"
        return None, Skip(contained_bug(error, "while planning", strict, where=where))


def resolve_config(config: Optional[SliceConfig], options: dict[str, Any]) -> SliceConfig:
    if config is None:
        config = SliceConfig()
    elif not isinstance(config, SliceConfig):
        raise TypeError(f"config must be a SliceConfig, got {type(config).__name__}")
    return config.with_options(**options) if options else config


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while the program grows.

    Every emitted op and var is kept by the graph, so the full collections that
    thousands of new objects trigger find nothing to free, yet each one traverses the
    whole (large) program: with it running, rewrite time per site grows with program size.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def _graph_pass_scope() -> Iterator[None]:
    """Mark emitted ops as made by a graph pass, so coremltools carries scope info over to them."""
    if SCOPE_STACK.get_curr_scopes().get(ScopeSource.COREMLTOOLS_GRAPH_PASS):
        yield
        return
    with mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=[PASS_NAME])):
        yield


def _site_report(function: str, site: AttentionSite, geometry: Optional[SiteGeometry], plan: Plan) -> SiteReport:
    mask = site.mask
    fields = plan.report_fields()
    folded = site.heads if isinstance(plan, SitePlan) else None
    fields["notes"] = (*site.notes, *([folded.describe()] if folded else []), *fields["notes"])
    return SiteReport(
        function=function,
        op_name=site.anchor.name,
        kind=site.kind,
        status="rewritten" if isinstance(plan, SitePlan) else "skipped",
        query_length=None if geometry is None else geometry.query_length,
        key_length=None if geometry is None else geometry.key_length,
        dtype=dtype_name(site.query),
        query_shape=report_shape(site.query),
        key_shape=site.key_shape(),
        value_shape=report_shape(site.value),
        mask_shape=None if mask is None else report_shape(mask),
        score_ops=tuple(step.op_type for step in site.steps if not step.is_mask),
        weight_ops=tuple(step.op_type for step in site.weight_steps),
        kv_heads=None if folded is None else folded.kv_heads,
        kv_repeats=None if folded is None else folded.repeats,
        kv_layout=None if folded is None else folded.layout,
        **fields,
    )


def _near_miss_report(function: str, miss: NearMiss) -> NearMissReport:
    return NearMissReport(
        function=function,
        op_name=miss.start.name,
        pattern=miss.pattern,
        reason=miss.reason,
        chain=tuple(f"{op.op_type} '{op.name}'" for op in miss.ops),
    )


def _program_notes(prog: Program, functions_with_sites: set[str]) -> tuple[str, ...]:
    notes = []
    for name, function in prog.functions.items():
        if name in functions_with_sites:
            continue
        opset = function.opset_version
        opset_text = "unknown opset" if opset is None else opset.name
        notes.append(f"function '{name}' ({opset_text}): no attention found")
    return tuple(notes)
