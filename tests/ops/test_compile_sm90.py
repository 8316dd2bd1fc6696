"""The Triton kernels compile for sm_90 on this CPU-only machine (see sm90_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("bytes of cubin") == 34, done.stdout  # every variant of sm90_compile.variants()
