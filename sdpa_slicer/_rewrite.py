"""``slice_attention``: walk -> match -> plan -> emit -> report, over a whole program."""

from __future__ import annotations

import contextlib
import functools
import gc
from typing import Any, Iterator, Optional

from coremltools.converters.mil.mil import Builder as mb, Program
from coremltools.converters.mil.mil.scope import SCOPE_STACK, ScopeInfo, ScopeSource

from sdpa_slicer._config import SliceConfig
from sdpa_slicer._emit import BlockEmitter
from sdpa_slicer._transaction import EmitError, NameAllocator, first_line
from sdpa_slicer._match import AttentionSite, find_sites
from sdpa_slicer._memory import estimate_memory
from sdpa_slicer._patterns import PATTERNS
from sdpa_slicer._plan import Plan, SitePlan, Skip, plan_site
from sdpa_slicer._report import REWRITTEN, SKIPPED, SiteReport, SliceReport
from sdpa_slicer._walk import walk_blocks

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
    if not isinstance(prog, Program):
        raise TypeError(f"slice_attention expects a coremltools MIL Program, got {type(prog).__name__}")
    config = resolve_config(config, options)
    with _cyclic_gc_paused():
        return _slice_program(prog, config, strict)


def _slice_program(prog: Program, config: SliceConfig, strict: bool) -> SliceReport:
    memory_before = tuple(estimate_memory(prog, name) for name in prog.functions)
    reports: list[SiteReport] = []
    functions_with_sites: set[str] = set()
    names_by_function: dict[str, NameAllocator] = {}
    with _graph_pass_scope():
        for visit in walk_blocks(prog):
            sites = find_sites(visit.function_name, visit.ops, config, PATTERNS)
            if not sites:
                continue
            functions_with_sites.add(visit.function_name)
            planned = [(site, _plan(site, config), site.anchor.name) for site in sites]
            errors: dict[int, str] = {}
            if any(isinstance(plan, SitePlan) for _, plan, _ in planned):
                names = names_by_function.get(visit.function_name)
                if names is None:
                    names = NameAllocator.for_function(prog.functions[visit.function_name])
                    names_by_function[visit.function_name] = names
                with visit.block:
                    emitter = BlockEmitter(visit.block, names)
                    for index, (site, plan, _) in enumerate(planned):
                        if not isinstance(plan, SitePlan):
                            continue
                        try:
                            emitter.rewrite(site, plan)
                        except EmitError as error:
                            if strict:
                                raise
                            errors[index] = str(error)
            reports += [
                _site_report(site, plan, op_name, errors.get(index))
                for index, (site, plan, op_name) in enumerate(planned)
            ]
    memory_after = tuple(estimate_memory(prog, name) for name in prog.functions)
    return SliceReport(tuple(reports), _program_notes(prog, functions_with_sites), memory_before, memory_after)


def _plan(site: AttentionSite, config: SliceConfig) -> Plan:
    try:
        return plan_site(site.geometry(), config)
    except Exception as error:  # a bug, contained: the site is left as it was
        return Skip(
            f"unexpected {type(error).__name__} ({first_line(error)}) while planning; the site was left "
            "as it was. This is a bug in sdpa_slicer: please report it"
        )


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


def _site_report(site: AttentionSite, plan: Plan, op_name: str, error: Optional[str]) -> SiteReport:
    geometry = site.geometry()
    located = functools.partial(
        SiteReport,
        function=site.function_name,
        op_name=op_name,
        kind=site.kind,
        query_length=geometry.query_length,
        key_length=geometry.key_length,
    )
    if isinstance(plan, SitePlan) and not error:
        return located(
            status=REWRITTEN,
            num_chunks=plan.num_chunks,
            chunk_size=plan.chunk_size,
            key_chunks=plan.max_key_chunks,
            scores_bytes_before=plan.scores_bytes_before,
            scores_bytes_after=plan.scores_bytes_after,
            matmul_work_before=plan.matmul_work_before,
            matmul_work_after=plan.matmul_work_after,
            notes=plan.notes,
        )
    if isinstance(plan, SitePlan):
        reason, scores_bytes, work = error, plan.scores_bytes_before, plan.matmul_work_before
    else:
        reason, scores_bytes, work = plan.reason, plan.scores_bytes, plan.matmul_work
    return located(
        status=SKIPPED,
        reason=reason,
        scores_bytes_before=scores_bytes,
        scores_bytes_after=scores_bytes,
        matmul_work_before=work,
        matmul_work_after=work,
        notes=plan.notes,
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
