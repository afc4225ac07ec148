"""Installing: `setup.py` run where torch is not importable (pip's default isolated build environment, i.e.
`pip install -e .` without `--no-build-isolation`) exits with the commands to run, not an ImportError traceback.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.bad_input(1)
def test_setup_without_torch_says_what_to_run():
    # sys.modules["torch"] = None makes `import torch` raise ImportError, as in a build env without torch
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "torch importable in the build environment" in r.stderr
    assert "pip install --no-build-isolation -e ." in r.stderr
    assert "https://download.pytorch.org/whl/cpu" in r.stderr
