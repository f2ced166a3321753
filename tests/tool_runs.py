"""Runs a tool as a user would (subprocess, CPU, one device) and checks its one-line error report."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def env() -> dict:
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  e.pop("XLA_FLAGS", None)  # one CPU device per process
  return e


def run_tool(tool: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, f"tools/{tool}", *map(str, args)], cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, tool: str, *needles: str) -> str:
  """Exit code 2, no traceback, exactly one ``tool: error: ...`` line holding every needle; returns it."""
  assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{tool}: error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]
