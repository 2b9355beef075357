"""diffguide on older diffusers: a feature that needs a newer release says so in one line, and
the shims read both forms of the internals diffusers changed."""

from __future__ import annotations

import types

import diffusers
import pytest
import torch
from diffusers.hooks import HookRegistry

import diffguide as dg
from diffguide import versions


@pytest.fixture
def installed(monkeypatch):
    """Pretend another diffusers is installed."""

    def set_version(version: str) -> None:
        monkeypatch.setattr(diffusers, "__version__", version)
        versions.diffusers_version.cache_clear()

    yield set_version
    versions.diffusers_version.cache_clear()


def test_require_diffusers_compares_releases_not_strings(installed):
    installed("0.100.0.dev0")
    versions.require_diffusers("x", "0.99")  # 0.100 > 0.99 although "0.100" < "0.99" as text
    installed("0.36.2")
    with pytest.raises(ImportError, match=r"^x needs diffusers>=0.37, but 0.36.2 is installed"):
        versions.require_diffusers("x", versions.DIFFUSERS_MIN)


def test_cache_context_name_reads_old_and_new_state_managers():
    new = types.SimpleNamespace(_context=types.SimpleNamespace(name="uncond"))
    old = types.SimpleNamespace(_current_context="cond")  # diffusers < 0.41
    assert versions.cache_context_name(new) == "uncond"
    assert versions.cache_context_name(old) == "cond"
    assert versions.cache_context_name(types.SimpleNamespace(_context=None)) is None


def test_forget_child_hooks_clears_the_cached_list_of_hooked_submodules():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if hasattr(registry, "_get_child_registries"):
        before = registry._get_child_registries()
        HookRegistry.check_if_exists_or_initialize(model[1])  # a hook added after the list was cached
        versions.forget_child_hooks(model)
        assert len(registry._get_child_registries()) == len(before) + 1
    fake = types.SimpleNamespace(_child_registries_cache=["stale"])  # diffusers 0.38-0.40's form
    holder = torch.nn.Module()
    holder._diffusers_hook = fake
    versions.forget_child_hooks(holder)
    assert fake._child_registries_cache is None


def test_a_pipeline_served_only_from_a_newer_diffusers_is_refused_with_the_version(installed):
    from tiny_batched import tiny_auraflow

    pipe = tiny_auraflow()
    installed("0.40.0")
    with pytest.raises(
        TypeError, match=r"AuraFlowPipeline needs diffusers>=0.41 .*begin index.*pip install -U"
    ):
        dg.apply(pipe, dg.CFG())
    installed("0.41.0")
    dg.apply(pipe, dg.CFG())
    dg.remove(pipe)
