"""Shared test setup: CPU context, a temp log folder, a fixture that runs a test in both modes, and the
`e2e` marker.

`e2e` (registered in pyproject.toml) marks the end-to-end tests: those that start a subprocess (a project CLI,
`python -c` around one, msrun, bash scripts/...). `pytest -m "not e2e"` runs the unit tests, `pytest -m e2e` the
CLI tests. The rule is read from the code, so a new test needs no list: a test is e2e when its function, a helper
function of tests/ it names (through module globals, helpers imported from other test modules included,
transitively), or a fixture it requests (by argument or `usefixtures`, and the fixtures those request) refers to
the `subprocess` module (imported at the top or in the function) or to a name imported from it (`Popen`, `run`).
Autouse fixtures do not count: test_dryrun.py's and test_parallel.py's start their background launches for every
test of their module, and the tests that need a launch's result request it by name.
"""
import atexit
import os
import shutil
import subprocess
import tempfile
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
FIXTURES = os.path.join(TESTS, "fixtures")
# MindFormers' logger writes under $LOCAL_DEFAULT_PATH (default ./output), read each time it makes a logger
# (per log path, on first use): a temp folder for the whole session and its subprocesses, never the checkout.
# Tests of where a run puts its log (<output_dir>/log, runner.execute) start it with USER_ENV, as users do.
LOG_ROOT = tempfile.mkdtemp(prefix="mixtral-ms-tests-")
atexit.register(shutil.rmtree, LOG_ROOT, ignore_errors=True)
os.environ.setdefault("LOCAL_DEFAULT_PATH", LOG_ROOT)
USER_ENV = {k: v for k, v in os.environ.items() if k != "LOCAL_DEFAULT_PATH"}

import mindspore as ms

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


def _starts_subprocess(func, seen) -> bool:
    """Whether `func` (a test, fixture or helper under tests/) names the subprocess module, or a helper of tests/
    that does; `seen`: the code objects already visited."""
    code = getattr(func, "__code__", None)
    if code is None or code in seen or not code.co_filename.startswith(TESTS + os.sep):
        return False
    seen.add(code)
    names, stack = set(), [code]
    while stack:  # the function's names and those of the functions, lambdas and comprehensions nested in it
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    if "subprocess" in names:  # the module, global or imported in the function
        return True
    for name in names:
        value = func.__globals__.get(name)
        if value is subprocess or getattr(value, "__module__", None) == "subprocess":
            return True
        if isinstance(value, types.FunctionType) and _starts_subprocess(value, seen):
            return True
    return False


def _is_e2e(item) -> bool:
    """The module docstring's rule for one collected test."""
    seen_code = set()
    if _starts_subprocess(getattr(item, "function", None), seen_code):
        return True
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    requested = list(info.argnames) + [name for mark in item.iter_markers("usefixtures") for name in mark.args]
    seen_fixtures = set()
    while requested:
        name = requested.pop()
        if name in seen_fixtures or not info.name2fixturedefs.get(name):
            continue
        seen_fixtures.add(name)
        fixturedef = info.name2fixturedefs[name][-1]
        if _starts_subprocess(fixturedef.func, seen_code):
            return True
        requested.extend(fixturedef.argnames)
    return False


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    """Background launches start with their module and run beside the rest of the suite (one core is mostly
    idle in this single-threaded process): tests/test_dryrun.py's compile matrix first (it is the longest),
    then tests/test_parallel.py's 2-process msrun launch; the tests that wait for them run last. Then the
    end-to-end tests are marked `e2e` (the module docstring's rule)."""
    def waits(item):
        return (item.path.name == "test_parallel.py" and item.name.startswith("test_msrun_")) or \
            (item.path.name == "test_dryrun.py" and item.name.startswith("test_matrix_"))
    starts = [item for item in items if item.path.name == "test_dryrun.py" and not waits(item)]
    waiting = [item for item in items if waits(item)]
    items[:] = starts[:1] + [item for item in items if item not in waiting and item not in starts[:1]] + waiting
    for item in items:
        if _is_e2e(item):
            item.add_marker(pytest.mark.e2e)


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
