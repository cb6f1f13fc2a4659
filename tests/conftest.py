"""Packages shared by the package and command-line tests, written once per session; treat them as read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from packages import (
    COMPRESSIONS,
    kv_cache_package,
    multifunction_package,
    near_miss_package,
    projected_package,
    stateful_package,
)


@pytest.fixture(scope="session")
def single_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return projected_package(tmp_path_factory.mktemp("single") / "projected.mlpackage")


@pytest.fixture(scope="session")
def multi_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return multifunction_package(tmp_path_factory.mktemp("multi") / "multi.mlpackage")


@pytest.fixture(scope="session")
def state_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stateful_package(tmp_path_factory.mktemp("state") / "stateful.mlpackage")


@pytest.fixture(scope="session")
def near_misses_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return near_miss_package(tmp_path_factory.mktemp("near") / "near-misses.mlpackage")


@pytest.fixture(scope="session", params=sorted(COMPRESSIONS))
def kv_package(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prefill/decode package over KV-cache states with compressed weights, per compression."""
    return kv_cache_package(tmp_path_factory.mktemp(request.param) / "kv.mlpackage", request.param)
