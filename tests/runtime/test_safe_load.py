"""Loading a checkpoint never runs code from it (orch.runtime.checkpoint.safe_load).

Each test plants a pickle that would write a marker file when unpickled, forges the manifest so
the hashes match (an attacker who can write the files can write the manifest too), and checks
that orch refuses it, names the file, and the marker never appears. Where torch's own reader is
the hole, the test first shows that plain DCP does run the planted code, so the check can fail.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from orch.config import Config
from orch.runtime.checkpoint import MANIFEST, CheckpointError, CheckpointManager, verify
from orch.runtime.checkpoint.safe_load import read_metadata

PLAN = {"world_size": 1, "degrees": {}}


class Payload:
    """Unpickling this calls ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def forge(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace ``name`` in ``checkpoint`` and rewrite the manifest's size and hash to match."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def state(value: float) -> dict[str, Any]:
    return {"model": {"w": torch.full((3, 2), value)}, "optim": {"lr": 1e-3, "betas": (0.9, 0.95)}}


@pytest.fixture
def saved(tmp_path) -> tuple[CheckpointManager, Path, Path]:
    """A run directory with complete checkpoints at steps 1 and 2."""
    mgr = CheckpointManager(tmp_path / "run", Config(), PLAN)
    first = mgr.save(1, state(1.0), {"sample": 1})
    second = mgr.save(2, state(2.0), {"sample": 2})
    return mgr, first, second


def test_the_index_reads_as_plain_pickle_does(saved) -> None:
    _, first, _ = saved
    with open(first / ".metadata", "rb") as f:
        plain = pickle.load(f)
    safe = read_metadata(first)
    assert safe.state_dict_metadata == plain.state_dict_metadata
    assert safe.storage_data == plain.storage_data


def test_a_planted_index_pickle_is_refused_and_never_runs(saved, tmp_path) -> None:
    mgr, first, second = saved
    marker = tmp_path / "ran-index"
    forge(second, ".metadata", pickle.dumps(Payload(marker)))
    problems = verify(second)
    assert len(problems) == 1 and ".metadata" in problems[0] and "builtins.exec" in problems[0]
    with pytest.raises(CheckpointError, match=r"\.metadata.*builtins\.exec.*nothing in it ran"):
        mgr.load(second, state(0.0))
    with pytest.raises(CheckpointError, match="builtins.exec"):
        mgr.resolve_resume(str(second))
    assert mgr.resolve_resume("auto") == first  # auto passes over it to the previous one
    assert not marker.exists()
    with open(second / ".metadata", "rb") as f:
        pickle.load(f)  # what torch's FileSystemReader does with it
    assert marker.exists(), "the planted pickle should have run under plain pickle"


def test_a_planted_value_pickle_is_refused_and_never_runs(tmp_path) -> None:
    """A non-tensor value (optimizer hyperparameters are stored so) holding code: DCP's default
    planner reads those with ``torch.load(weights_only=False)``."""
    marker = tmp_path / "ran-value"
    mgr = CheckpointManager(tmp_path / "run", Config(), PLAN)
    path = mgr.save(1, {"model": {"w": torch.ones(2)}, "optim": {"lr": Payload(marker)}}, {})
    assert not marker.exists()
    refused = r"checkpoint value optim\.lr.*GLOBAL exec.*nothing in it ran"
    with pytest.raises(CheckpointError, match=refused):
        mgr.load(path, {"model": {"w": torch.zeros(2)}, "optim": {"lr": 0.0}})
    assert not marker.exists()
    dcp.load({"model": {"w": torch.zeros(2)}, "optim": {"lr": 0.0}}, checkpoint_id=path,
             no_dist=True)
    assert marker.exists(), "the planted pickle should have run under DCP's default planner"


def test_a_planted_rng_pickle_is_refused_and_never_runs(saved, tmp_path) -> None:
    mgr, _, second = saved
    marker = tmp_path / "ran-rng"
    forge(second, "rng-rank-00000.pt", pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"rng-rank-00000\.pt.*nothing in it ran"):
        mgr.load(second, state(0.0))
    assert not marker.exists()


def test_hyperparameters_and_tensors_still_load(saved) -> None:
    mgr, _, second = saved
    into = state(0.0)
    into["optim"]["lr"], into["optim"]["betas"] = 0.0, (0.0, 0.0)
    manifest = mgr.load(second, into)
    assert manifest.step == 2 and torch.equal(into["model"]["w"], torch.full((3, 2), 2.0))
    assert into["optim"] == {"lr": 1e-3, "betas": (0.9, 0.95)}
