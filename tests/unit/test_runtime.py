"""Connecting to Ray: the worker setup hook a job gets."""

from __future__ import annotations

import importlib

from raysearch.runtime import RAY_SETUP_HOOK_ENV, training_setup_hook


def test_a_quiet_training_job_gets_the_hook_unless_it_has_its_own():
    hook = training_setup_hook(True, False, {})
    module, name = hook.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))   # importable in a worker
    assert training_setup_hook(False, False, {}) is None              # builds, serving: none
    assert training_setup_hook(True, True, {}) is None                # -v: Ray's lines stay
    # A job submitted with a hook of its own keeps it (Ray would refuse a second one).
    assert training_setup_hook(True, False, {RAY_SETUP_HOOK_ENV: "theirs.setup"}) is None
