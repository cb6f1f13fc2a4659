"""Failures injected into the emitter: a site's real subgraph is built, then its rewrite fails."""

from __future__ import annotations

from typing import Callable

import pytest
from coremltools.converters.mil.mil import Var

from sdpa_slicer._rewrite.emit.site import SiteLayout

INJECTED = "injected failure"


def fail_after_emitting(site_name: str, message: str = INJECTED) -> Callable[[SiteLayout], Var]:
    """A stand-in for ``SiteLayout.build``: emits the real subgraph, then raises for one site."""
    build = SiteLayout.build

    def build_then_fail(layout: SiteLayout) -> Var:
        output = build(layout)
        if layout.site.anchor.name == site_name:
            raise RuntimeError(message)
        return output

    return build_then_fail


def fail_site(monkeypatch: pytest.MonkeyPatch, site_name: str, message: str = INJECTED) -> None:
    """Make the rewrite of the site whose anchor is ``site_name`` fail once its ops are emitted."""
    monkeypatch.setattr(SiteLayout, "build", fail_after_emitting(site_name, message))
