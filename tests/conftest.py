"""Shared test setup: CPU context, the repo on sys.path, and a fixture that runs a test in both modes."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

import mindspore as ms  # noqa: E402

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


@pytest.fixture(params=[ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def mode(request):
    """Run the test under PYNATIVE_MODE and GRAPH_MODE; restore PyNative afterwards."""
    ms.set_context(mode=request.param)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def trainer_context():
    """For modules that run MindFormers' Trainer (`pytestmark = pytest.mark.usefixtures("trainer_context")`):
    its build_context switches to GRAPH_MODE and sets the parallel context; later modules expect PyNative."""
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.reset_auto_parallel_context()
