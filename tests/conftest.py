"""Shared test setup: CPU context, a temp log folder, and a fixture that runs a test in both modes."""
import atexit
import os
import shutil
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# MindFormers' logger writes under $LOCAL_DEFAULT_PATH (default ./output), read each time it makes a logger
# (per log path, on first use): a temp folder for the whole session and its subprocesses, never the checkout.
# Tests of where a run puts its log (<output_dir>/log, runner.execute) start it with USER_ENV, as users do.
LOG_ROOT = tempfile.mkdtemp(prefix="mixtral-ms-tests-")
atexit.register(shutil.rmtree, LOG_ROOT, ignore_errors=True)
os.environ.setdefault("LOCAL_DEFAULT_PATH", LOG_ROOT)
USER_ENV = {k: v for k, v in os.environ.items() if k != "LOCAL_DEFAULT_PATH"}

import mindspore as ms

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


def pytest_collection_modifyitems(items):
    """Background launches start with their module and run beside the rest of the suite (one core is mostly
    idle in this single-threaded process): tests/test_dryrun.py's compile matrix first (it is the longest),
    then tests/test_parallel.py's 2-process msrun launch; the tests that wait for them run last."""
    def waits(item):
        return (item.path.name == "test_parallel.py" and item.name.startswith("test_msrun_")) or \
            (item.path.name == "test_dryrun.py" and item.name.startswith("test_matrix_"))
    starts = [item for item in items if item.path.name == "test_dryrun.py" and not waits(item)]
    waiting = [item for item in items if waits(item)]
    items[:] = starts[:1] + [item for item in items if item not in waiting and item not in starts[:1]] + waiting


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
