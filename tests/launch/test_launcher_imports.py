"""``orch launch`` starts workers sooner when its own process imports only what it uses."""

from __future__ import annotations

import subprocess
import sys

from launch_harness import REPO


def test_the_launcher_does_not_import_dtensor_or_sympy():
    """The launcher validates, plans and runs torchrun's agent: DTensor (and sympy under it)
    came in with the NVMe tier's module for its scratch-file sweep, about half a second of
    every launch on 2 cores before any worker started (the workers import them anyway)."""
    code = ("import sys, orch.cli, orch.launch.launcher; "
            "print(sorted(m for m in ('torch.distributed.tensor', 'sympy', 'orch.models') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert done.stdout.splitlines()[-1] == "[]"
