"""The Triton kernels of attnflow.probes.fused, run by Triton's interpreter on the CPU (CI has no
GPU): tests/fused_interpreted.py in a fresh process, TRITON_INTERPRET=1 being read at import."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from attnflow.probes import fused

HERE = Path(__file__).parent


def test_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(HERE / "fused_interpreted.py")], env=env, capture_output=True, text=True, cwd=HERE.parent)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def test_the_cpu_takes_the_torch_path_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused.available(torch.device("cpu"))
