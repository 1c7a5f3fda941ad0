"""The local registry of deployments: one record file per deployment name."""

from __future__ import annotations

import os

import pytest

from mii.rpc import registry


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    return tmp_path


NAMES = [
    "a/b",
    "a_b",
    "a%2Fb",
    "a b",
    "a.b",
    "org/model-mii-deployment",  # mii.serve("org/model")'s default name before issue 16
    "org_model-mii-deployment",
    "modèle",
    "mod_le",
    "x" * 300,
    "x" * 299 + "y",
    ".",
    "..",
]


def test_distinct_names_never_share_a_record():
    for i, name in enumerate(NAMES):
        registry.record(name, {"pid": os.getpid(), "port": 50000 + i})
    stems = {registry.file_stem(n) for n in NAMES}
    assert len(stems) == len(NAMES)
    for i, name in enumerate(NAMES):
        info = registry.lookup(name)
        assert info["deployment_name"] == name and info["port"] == 50000 + i
    assert sorted(d["deployment_name"] for d in registry.list_deployments()) == sorted(NAMES)
    assert len({registry.log_path(n) for n in NAMES}) == len(NAMES)


def test_records_stay_in_the_registry_folder(cache):
    for name in NAMES:
        path = registry.log_path(name)
        assert path.parent == registry.registry_dir()
        assert len(path.name.encode()) < 255
    assert registry.file_stem("test-deploy") == "test-deploy"  # plain names read as themselves


def test_remove_forgets_only_that_name():
    registry.record("a/b", {"pid": os.getpid()})
    registry.record("a_b", {"pid": os.getpid()})
    registry.remove("a/b", pid=os.getpid())
    assert registry.lookup("a/b") is None
    assert registry.lookup("a_b")["deployment_name"] == "a_b"
