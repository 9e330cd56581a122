"""Suite-wide rules: every test starts in a known autograd mode, and hypothesis is reproducible in CI.

* Grad mode is thread-global state. A test module that switched it off at import time used to leak
  into every module collected after it, so whether a training test saw autograd depended on the order
  of the files. Now each test runs with autograd on, or off when its module or the test carries
  `pytest.mark.inference`, and the mode is restored afterwards whatever the test did.
* `small_model_dir`: one small FastVLM folder in Apple's layout for the command-line tests (a tiny
  FastViTHD at 128 px, a 2-layer Qwen2 with the real vocabulary and tokenizer), written once a session.
* `--dtype auto` runs in bfloat16 on a CPU with bf16 units and in float32 on one without, and CI's CPU
  changes between runs. The command-line tests compare answers with the Python API's float32 ones, so
  they see a CPU without bf16 units (speedups.bf16_units answers no) unless a test says otherwise:
  tests/test_precision.py checks auto's choice both ways, and bfloat16 answers by name.
* Hypothesis draws new examples on every run by default, so whether a bug is caught could depend on
  the draw. Under CI (the `CI` environment variable, which `.ci/run` gets) the `ci` profile derandomizes
  the draws: the same examples every run. Locally the `dev` profile explores new ones; choose either
  with HYPOTHESIS_PROFILE=ci|dev.
"""

import os

import pytest
import torch
from hypothesis import settings

import repmixer as R
from synthetic import write_fastvlm_checkpoint

SMALL_VISION = R.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=16, image_size=128)

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


@pytest.fixture(autouse=True)
def cpu_without_bf16_units(monkeypatch):
    from support import speedups

    monkeypatch.setattr(speedups, "bf16_units", lambda cpuinfo=None: (False, "a CPU without bf16 units (the tests' own)"))


def pytest_report_header(config):
    return f"hypothesis profile: {settings._current_profile}"


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    return write_fastvlm_checkpoint(tmp_path_factory.mktemp("small-model") / "m", vision_cfg=SMALL_VISION)
