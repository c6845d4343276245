"""Packaging: license metadata, the version, and what `import attnquant` does without a GPU
when numpy is missing or too new for Triton's interpreter (one clear line, not a traceback
from deep inside a kernel launch).

The import checks run in subprocesses with CUDA_VISIBLE_DEVICES="" (no GPU seen, so the
interpreter path is taken even on a GPU machine) and a stand-in numpy package placed first
on sys.path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent

# A numpy that imports the real one and reports another version: torch and Triton get a
# working numpy, only the version string is changed (a bare module with nothing but
# __version__ would break `import torch` before attnquant's check could run).
_NUMPY_WITH_VERSION = """\
import os, sys
_fake_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _fake_root]
del sys.modules["numpy"]
import numpy as _real
_real.__version__ = {version!r}
"""

# numpy absent. ModuleNotFoundError is the ImportError that a missing package raises, and
# the only kind torch's own optional `import numpy` tolerates.
_NUMPY_MISSING = 'raise ModuleNotFoundError("No module named \'numpy\'", name="numpy")\n'


def _pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _import_attnquant(fake_numpy_dir=None, code="import attnquant"):
    prelude = ""
    if fake_numpy_dir is not None:
        prelude = f"import sys; sys.path.insert(0, {str(fake_numpy_dir)!r}); "
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)  # set by this process's own import of attnquant
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def _fake_numpy(tmp_path, source):
    pkg = tmp_path / "numpy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(source)
    return tmp_path


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("version", ["2.4.0", "2.3.0rc1"])
def test_import_without_gpu_rejects_numpy_too_new(tmp_path, version):
    fake = _fake_numpy(tmp_path, _NUMPY_WITH_VERSION.format(version=version))
    res = _import_attnquant(fake)
    assert res.returncode != 0, res.stdout + res.stderr
    last = _last_line(res.stderr)
    assert last.startswith("ImportError: attnquant"), res.stderr
    assert "numpy<2.3" in last
    assert f"found numpy {version}" in last
    assert "attnquant[interpret]" in last


def test_import_without_gpu_rejects_missing_numpy(tmp_path):
    fake = _fake_numpy(tmp_path, _NUMPY_MISSING)
    res = _import_attnquant(fake)
    assert res.returncode != 0, res.stdout + res.stderr
    last = _last_line(res.stderr)
    assert last.startswith("ImportError: attnquant"), res.stderr
    assert "numpy<2.3" in last
    assert "numpy is not installed" in last
    # one line, raised by attnquant itself: not chained onto the numpy ImportError
    assert "During handling of the above exception" not in res.stderr


def test_import_without_gpu_accepts_older_numpy(tmp_path):
    fake = _fake_numpy(tmp_path, _NUMPY_WITH_VERSION.format(version="2.2.99"))
    res = _import_attnquant(fake, "import attnquant, numpy; print(numpy.__version__)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "2.2.99"


def test_real_environment_imports_and_version_matches_pyproject():
    """This environment's numpy with the GPU hidden: the interpreter path imports where numpy < 2.3
    (CI), and refuses by name where it is newer (the GPU machine's torch image has 2.5)."""
    import numpy
    code = "import os, attnquant; print(attnquant.__version__); print(os.environ.get('TRITON_INTERPRET'))"
    res = _import_attnquant(None, code)
    if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 3):
        assert res.returncode != 0 and "needs numpy<2.3" in res.stderr, res.stderr
        return
    assert res.returncode == 0, res.stderr
    version, interpret = res.stdout.strip().splitlines()[-2:]
    assert version == _pyproject()["project"]["version"]
    assert interpret == "1"  # no GPU seen: the interpreter path


def test_license_file_and_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the attnquant authors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in text
    project = _pyproject()["project"]
    license_ = project["license"]
    if isinstance(license_, str):  # SPDX expression (PEP 639)
        assert license_ == "MIT"
        assert "LICENSE" in project.get("license-files", [])
        # setuptools rejects license classifiers next to an SPDX expression
        assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    else:
        assert "MIT" in license_.get("text", "")
    assert "hypothesis" in project["optional-dependencies"]["test"]
