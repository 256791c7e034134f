"""`pip install -e .` in a fresh venv gives working console scripts (pyproject.toml), run from outside the
checkout with no PYTHONPATH: the package is found through the install, not through the current folder."""
import json
import os
import site
import subprocess
import sys
import venv

import pytest

from conftest import FIXTURES, ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv that sees this one's dependencies (mindspore, numpy, ...) through a .pth file, so only the
    package itself comes from `pip install -e .`."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(home)  # this venv's pip installs into it (pip --python): no ensurepip
    py = home / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "dependencies.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--disable-pip-version-check",
                              "--no-deps", "--no-build-isolation", "-e", ROOT], capture_output=True, text=True, env=env,
                             cwd=home, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    return home, env


def test_console_scripts_run_from_an_editable_install(fresh_venv, tmp_path):
    home, env = fresh_venv
    bin_dir = home / "bin"
    where = subprocess.run([bin_dir / "python", "-c", "import mixtral_ms; print(mixtral_ms.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.strip() == os.path.join(ROOT, "mixtral_ms", "__init__.py")
    for name in ("run", "convert", "experts", "compress", "dryrun", "memory", "preprocess", "tokenizer",
                 "plot-router"):
        out = subprocess.run([bin_dir / f"mixtral-ms-{name}", "--help"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("usage: "), (name, out.stderr[-500:])
    plan = subprocess.run([bin_dir / "mixtral-ms-convert", "plan", "--src", os.path.join(FIXTURES, "tiny8")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert plan.returncode == 0 and "hf2ms" in plan.stdout + plan.stderr, plan.stderr[-500:]
    memory = subprocess.run([bin_dir / "mixtral-ms-memory", "--config",
                             os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_pretrain_8p.yaml")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert memory.returncode == 0 and "dp8 mp1 ep8 pp1 (8 devices)" in memory.stdout, memory.stderr[-500:]
    bad = subprocess.run([bin_dir / "mixtral-ms-experts", "grow", "--src", str(tmp_path / "nope"), "--dst",
                          str(tmp_path / "out"), "--add", "1"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: "), bad.stderr
    assert not (tmp_path / "out").exists() and json.dumps(os.listdir(tmp_path)) == "[]"
