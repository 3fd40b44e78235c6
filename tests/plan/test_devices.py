"""The device catalog: figures, aliases, overrides, and the message for an unknown name."""

from __future__ import annotations

import pytest

from orch.errors import OrchError
from orch.plan.devices import (
    DEVICES,
    OVERRIDABLE,
    DeviceSpec,
    UnknownDeviceError,
    get_device,
    with_overrides,
)

GiB = 2**30


def test_catalog_has_the_datasheet_figures() -> None:
    h100 = DEVICES["h100-sxm-80gb"]
    assert h100.peak_flops == 989.4e12
    assert h100.memory_bytes == 80 * GiB
    assert h100.intra_node_bw == 450e9  # NVLink 4: 900 GB/s both directions
    assert h100.inter_node_bw == 50e9  # 400 Gb/s NDR per GPU
    assert DEVICES["h200"].peak_flops == h100.peak_flops
    assert DEVICES["h200"].memory_bytes == 143_771 * 2**20  # nvidia-smi's MiB
    assert DEVICES["a100-80gb"].peak_flops == 312e12
    assert DEVICES["a100-80gb"].intra_node_bw == 300e9
    assert DEVICES["rtx4090"].peak_flops == 165.2e12
    assert DEVICES["rtx4090"].memory_bytes == 24 * GiB
    assert DEVICES["rtx4090"].intra_node_bw < 32e9  # PCIe 4.0 x16, no NVLink
    assert DEVICES["cpu"].memory_bytes == 24 * GiB


@pytest.mark.parametrize("spec", list(DEVICES.values()), ids=list(DEVICES))
def test_every_entry_is_sane(spec: DeviceSpec) -> None:
    assert 0 < spec.compute_efficiency <= 1
    assert spec.peak_flops > 0 and spec.memory_bytes > 0
    assert spec.intra_node_bw >= spec.inter_node_bw > 0
    assert 0 < spec.intra_latency_s <= spec.inter_latency_s
    assert spec.description


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("h100", "h100-sxm-80gb"), ("H100", "h100-sxm-80gb"), (" a100 ", "a100-80gb"),
     ("4090", "rtx4090"), ("h200", "h200"), ("cpu", "cpu")],
)
def test_aliases_and_case(name: str, canonical: str) -> None:
    assert get_device(name) is DEVICES[canonical]


def test_unknown_device_names_value_suggestion_and_choices() -> None:
    with pytest.raises(UnknownDeviceError) as info:
        get_device("h10")
    text = str(info.value)
    assert "'h10'" in text
    assert "did you mean 'h100'?" in text
    assert "h100-sxm-80gb" in text and "rtx4090" in text and "cpu" in text
    assert isinstance(info.value, OrchError)
    assert info.value.message == "unknown device 'h10'"


def test_unknown_device_without_close_match_still_lists_choices() -> None:
    with pytest.raises(UnknownDeviceError) as info:
        get_device("tpu-v5")
    assert "did you mean" not in str(info.value)
    assert "known devices: " in info.value.fix


def test_overrides_replace_only_the_named_fields() -> None:
    base = get_device("h100")
    tuned = with_overrides(base, compute_efficiency=0.4, inter_node_bw=25e9)
    assert tuned.compute_efficiency == 0.4 and tuned.inter_node_bw == 25e9
    assert tuned.peak_flops == base.peak_flops and tuned.name == base.name
    assert base.compute_efficiency != 0.4  # the catalog entry is untouched


def test_overrides_reject_unknown_or_identity_fields() -> None:
    assert "name" not in OVERRIDABLE
    with pytest.raises(TypeError, match="peak_flop"):
        with_overrides(get_device("h100"), peak_flop=1.0)
