"""Suite-wide rules: every test starts in a known autograd mode, and hypothesis is reproducible in CI.

* Grad mode is thread-global state. A test module that switched it off at import time used to leak
  into every module collected after it, so whether a training test saw autograd depended on the order
  of the files. Now each test runs with autograd on, or off when its module or the test carries
  `pytest.mark.inference`, and the mode is restored afterwards whatever the test did.
* Hypothesis draws new examples on every run by default, so whether a bug is caught could depend on
  the draw. Under CI (the `CI` environment variable, which `.ci/run` gets) the `ci` profile derandomizes
  the draws: the same examples every run. Locally the `dev` profile explores new ones; choose either
  with HYPOTHESIS_PROFILE=ci|dev.
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config):
    config.addinivalue_line("markers", "inference: run the test with autograd off (torch.no_grad)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    before = torch.is_grad_enabled()
    torch.set_grad_enabled(item.get_closest_marker("inference") is None)
    try:
        return (yield)
    finally:
        torch.set_grad_enabled(before)


def pytest_report_header(config):
    return f"hypothesis profile: {settings._current_profile}"
