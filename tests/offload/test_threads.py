"""The offload engine's helper threads carry their names at the OS level (``top -H``, ``ps -L``,
``/proc``), not only in Python, where every thread of the process would read ``python``."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from orch.offload.threads import helper_pool, helper_thread, os_name

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux thread names")


def _os_name_of_this_thread() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


def test_pool_threads_are_named_in_the_os():
    with helper_pool("orch-nvme-read") as pool:
        assert pool.submit(_os_name_of_this_thread).result() == "nvme-read_0"


def test_a_helper_thread_is_named_in_the_os_and_runs_its_target():
    seen: list[str] = []
    thread = helper_thread("orch-cpu-optimizer", lambda a, b: seen.append(
        f"{a}{b} {_os_name_of_this_thread()}"), 1, 2)
    assert thread.daemon and thread.name == "orch-cpu-optimizer"
    thread.start()
    thread.join()
    assert seen == ["12 cpu-optimizer"]


def test_os_names_drop_the_prefix_and_keep_what_linux_keeps():
    assert os_name("orch-activation-io_0") == "activation-io_0"  # 15 characters: all kept
    assert os_name("orch-a-much-longer-helper_12") == "a-much-longer-h"
    assert os_name("gloo_tcp_loop") == "gloo_tcp_loop"
