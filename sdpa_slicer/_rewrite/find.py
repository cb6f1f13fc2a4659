"""Finding the sites of a block: every enabled pattern tried on every op, then every enabled fold
on every site found."""

from __future__ import annotations

from typing import Sequence

import attrs
from coremltools.converters.mil.mil import Operation

from sdpa_slicer._errors import contained_bug
from sdpa_slicer._rewrite.config import SliceConfig
from sdpa_slicer._rewrite.sites import AttentionSite, Failed, Fold, Match, NearMiss, Pattern, fail


@attrs.frozen
class Found:
    """The sites of one block in block order (of their anchors), and its near misses."""

    sites: tuple[AttentionSite, ...]
    near_misses: tuple[NearMiss, ...]


def find_sites(
    ops: Sequence[Operation],
    config: SliceConfig,
    patterns: Sequence[Pattern],
    folds: Sequence[Fold] = (),
    strict: bool = False,
) -> Found:
    """The sites and near misses among ``ops`` (one block's, in order). For each op the enabled
    patterns are tried in order and the first site wins; a near miss counts only if no pattern
    finds a site there. Each site then goes through the enabled ``folds``, in order. A site
    that shares an op with an earlier one (its scores are that attention's output, say) is a
    near miss. A pattern or fold that raises gives a near miss or a note saying so, or, with
    ``strict``, ``EmitError``."""
    enabled = [pattern for pattern in patterns if pattern.enabled(config)]
    enabled_folds = [fold for fold in folds if fold.enabled(config)]
    found: list[tuple[AttentionSite, str]] = []
    near_misses: list[NearMiss] = []
    for op in ops:
        misses: list[NearMiss] = []
        for pattern in enabled:
            result = _match(pattern, op, strict)
            if isinstance(result, AttentionSite):
                found.append((_folded(result, enabled_folds, strict), pattern.name))
                misses = []
                break
            if isinstance(result, NearMiss):
                misses.append(result)
        near_misses += misses
    position = {op: index for index, op in enumerate(ops)}
    found.sort(key=lambda entry: position[entry[0].anchor])
    taken: dict[Operation, AttentionSite] = {}
    sites = []
    for site, pattern_name in found:
        shared = next((op for op in site.ops if op in taken), None)
        if shared is None:
            sites.append(site)
            taken.update(dict.fromkeys(site.ops, site))
        else:
            reason = (
                f"its op '{shared.name}' belongs to the attention '{taken[shared].anchor.name}', rewritten on its own"
            )
            near_misses.append(fail(pattern_name, reason, site.anchor, site.ops))
    return Found(tuple(sites), tuple(near_misses))


def _folded(site: AttentionSite, folds: Sequence[Fold], strict: bool) -> AttentionSite:
    for fold in folds:
        try:
            result = fold.fold(site)
        except Exception as error:  # a bug in a fold, contained: the site stays as matched
            result = Failed(contained_bug(error, f"in the {fold.name} fold", strict, "the site was not folded"))
        if isinstance(result, AttentionSite):
            site = result
        elif result is not None:
            site = attrs.evolve(site, notes=(*site.notes, result.reason))
    return site


def _match(pattern: Pattern, op: Operation, strict: bool) -> Match:
    try:
        return pattern.match(op)
    except Exception as error:  # a bug in a pattern, contained: the op is left alone, and said why
        reason = contained_bug(error, f"in the {pattern.name} pattern", strict, "the op was left as it was")
        return fail(pattern.name, reason, op)
