"""A stand-in for the CANN libraries, so that MindSpore's Ascend plugin loads on a CPU-only host.

MindSpore's DryRun (`MS_SIMULATION_LEVEL=0`) runs the real host-side compiler, semi-auto-parallel passes
included, with the device side mocked; it needs `device_target: Ascend`, whose plugin links against CANN.
This module builds, with gcc and from the installed MindSpore's own plugin files, one shared library that
defines every symbol those files need and no library here provides (each a function returning 0; the
`acl*Create*` ones return a zeroed buffer), installs it under every CANN library name in a folder laid out
like a CANN install (MindSpore derives the CANN root from the path of the library holding `aclrtMalloc`),
plus the `hccl` Python package `mindspore.communication.init()` imports. Nothing here runs a kernel: a
graph compiled against it is checked by the compiler, never executed (docs/parallel.md, "Dry run").
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterable, Set

# The CANN libraries the plugin files link against or dlopen (measured on MindSpore 2.9.0).
CANN_LIBRARIES = (
    "libascendcl", "libc_sec", "libge_runner", "libgraph", "libhccl", "libmsprofiler", "libnnopbase",
    "libplatform", "libruntime", "libascendalog", "libmmpa", "libprofapi", "libregister", "libopapi",
    "libexe_graph", "libatb", "libacl_op_compiler", "libacl_tdt_channel", "libacl_tdt_queue", "libacl_dvpp",
    "libacl_dvpp_mpi", "libacl_dvpp_op",
)
# Names resolved with dlsym at run time: they appear as strings in the plugin files.
_DLSYM_NAME = re.compile(r"^(?:acl|aclnn|aclrt|aclop|aclmdl|Hccl|hccl|rt)[A-Z][A-Za-z0-9_]*$")
_ACLNN_OP = re.compile(r"^aclnn[A-Z][A-Za-z0-9]*$")
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_.$]*$")
HCCL_VERSION = "8.1.0"


class StubBuildError(RuntimeError):
    """The stand-in could not be built (no gcc or nm, or MindSpore's plugin files are missing)."""


def mindspore_dir() -> str:
    spec = importlib.util.find_spec("mindspore")
    if spec is None or not spec.submodule_search_locations:
        raise StubBuildError("mindspore is not installed in this Python")
    return list(spec.submodule_search_locations)[0]


def _plugin_files(ms_dir: str) -> list:
    plugin = os.path.join(ms_dir, "lib", "plugin")
    names = ["libmindspore_ascend.so.2", "libmindspore_ops_ascend.so"]
    files = [os.path.join(plugin, n) for n in names if os.path.isfile(os.path.join(plugin, n))]
    for root, _, names in os.walk(os.path.join(plugin, "ascend")):  # nested kernel libraries load too
        files += sorted(os.path.join(root, n) for n in names if re.search(r"\.so(\.\d+)*$", n))
    if not files:
        raise StubBuildError(f"no Ascend plugin files under {plugin}: this MindSpore build has no Ascend support")
    return files


def _nm(path: str, undefined: bool) -> Set[str]:
    flag = "--undefined-only" if undefined else "--defined-only"
    out = subprocess.run(["nm", "-D", flag, path], capture_output=True, text=True).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if parts:
            names.add(parts[-1].split("@")[0])
    return names


def _resolved_libraries(path: str) -> Set[str]:
    """What the dynamic loader finds for `path` here (system libraries, MindSpore's own)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return {m.group(1) for m in re.finditer(r"=>\s+(/\S+)", out)}


def _strings(path: str) -> Iterable[str]:
    with open(path, "rb") as f:
        data = f.read()
    for m in re.finditer(rb"[A-Za-z_][A-Za-z0-9_]{3,}", data):
        yield m.group().decode()


def stub_symbols(ms_dir: str) -> Set[str]:
    """Every symbol the stand-in must define: the plugin files' undefined symbols no library here
    defines, and the ACL/aclnn/HCCL/rt names resolved with dlsym, minus what `_c_dataengine` defines
    (a stub winning over the real one breaks MindRecord reading)."""
    plugins = _plugin_files(ms_dir)
    undefined: Set[str] = set()
    providers: Set[str] = set()
    for path in plugins:
        undefined |= _nm(path, undefined=True)
        providers |= _resolved_libraries(path)
    for root, _, files in os.walk(ms_dir):
        providers |= {os.path.join(root, f) for f in files if ".so" in f and not f.endswith(".a")}
    defined: Set[str] = set()
    for path in providers:
        defined |= _nm(path, undefined=False)
    wanted = {s for s in undefined - defined if _SYMBOL.match(s)}
    for path in plugins:
        for s in _strings(path):
            if _DLSYM_NAME.match(s) and s not in defined:
                wanted.add(s)
                if _ACLNN_OP.match(s):
                    wanted.add(s + "GetWorkspaceSize")
    dataengine = [os.path.join(ms_dir, f) for f in os.listdir(ms_dir) if f.startswith("_c_dataengine")]
    for path in dataengine:
        wanted -= _nm(path, undefined=False)
    return {s for s in wanted if not s.startswith(("_ITM_", "__gmon_start__", "__cxa_", "_Jv_"))}


def stub_source(symbols: Iterable[str]) -> str:
    """C source: each symbol a function returning 0 (`acl*Create*`: a zeroed 4 KiB buffer)."""
    lines = ["#include <stdlib.h>"]
    for i, name in enumerate(sorted(symbols)):
        if name.startswith("acl") and "Create" in name:
            lines.append(f'void *stub_{i}(void) __asm__("{name}");\nvoid *stub_{i}(void) {{ return calloc(1, 4096); }}')
        else:
            lines.append(f'long stub_{i}(void) __asm__("{name}");\nlong stub_{i}(void) {{ return 0; }}')
    return "\n".join(lines) + "\n"


def _fingerprint(ms_dir: str) -> str:
    """Changes with the MindSpore build and with this file."""
    h = hashlib.sha256()
    with open(__file__, "rb") as f:
        h.update(f.read())
    for path in _plugin_files(ms_dir):
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}:{st.st_size}".encode())
    return h.hexdigest()[:12]


def default_cache() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mixtral-ms")


def ensure_stub(cache_dir: str | None = None) -> str:
    """The stand-in's root (built once per MindSpore build, then reused): `<root>/latest/lib64` goes on
    LD_LIBRARY_PATH, `<root>/python` on PYTHONPATH (see `environment`)."""
    for tool in ("gcc", "nm", "ldd"):
        if shutil.which(tool) is None:
            raise StubBuildError(f"building the CANN stand-in needs {tool} on PATH")
    ms_dir = mindspore_dir()
    cache_dir = cache_dir or default_cache()
    root = os.path.join(cache_dir, f"cann-stub-{_fingerprint(ms_dir)}")
    if os.path.isfile(os.path.join(root, ".complete")):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".cann-stub-", dir=cache_dir)
    try:
        lib64 = os.path.join(work, "latest", "lib64")
        os.makedirs(os.path.join(lib64, "driver"))
        source = os.path.join(work, "stub.c")
        with open(source, "w") as f:
            f.write(stub_source(stub_symbols(ms_dir)))
        built = os.path.join(work, "libstub.so")
        done = subprocess.run(["gcc", "-shared", "-fPIC", "-O0", "-o", built, source], capture_output=True, text=True)
        if done.returncode:
            raise StubBuildError(f"gcc failed building the CANN stand-in: {done.stderr.strip()[:300]}")
        for name in CANN_LIBRARIES:
            shutil.copyfile(built, os.path.join(lib64, name + ".so"))
        shutil.copyfile(built, os.path.join(lib64, "driver", "libascend_hal.so"))
        hccl = os.path.join(work, "python", "hccl")
        os.makedirs(hccl)
        open(os.path.join(hccl, "__init__.py"), "w").close()
        with open(os.path.join(hccl, "sys_version.py"), "w") as f:
            f.write(f'__sys_version__ = "{HCCL_VERSION}"\n')
        open(os.path.join(work, ".complete"), "w").close()
        try:
            os.rename(work, root)
        except OSError:  # another process built it first
            if not os.path.isfile(os.path.join(root, ".complete")):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root


def environment(root: str, base: dict | None = None) -> dict:
    """`base` (default os.environ) with the stand-in on the library and Python paths."""
    env = dict(os.environ if base is None else base)
    lib64 = os.path.join(root, "latest", "lib64")
    libs = [lib64, os.path.join(lib64, "driver")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(root, "python")] + [p for p in [env.get("PYTHONPATH")] if p])
    return env
