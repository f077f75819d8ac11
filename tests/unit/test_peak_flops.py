"""The peak MFU is measured against: looked up from the device name, or given in the recipe."""

from __future__ import annotations

import pytest

from megatron_grow.config.loader import load_recipe
from megatron_grow.errors import ConfigError
from megatron_grow.training.peak_flops import lookup_peak_tflops, resolve_peak

# Names as torch.cuda.get_device_name() reports them; dense bf16 = the data sheet's sparse figure / 2.
NAMES = [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 1979 / 2),
    ("NVIDIA H100 PCIe", "H100 PCIe", 1513 / 2),
    ("NVIDIA H100 NVL", "H100 NVL", 1671 / 2),
    ("NVIDIA H200", "H200 SXM", 1979 / 2),
    ("NVIDIA H200 NVL", "H200 NVL", 1671 / 2),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ("NVIDIA B200", "B200", 2250.0),
    ("NVIDIA GB200", "GB200", 2500.0),
    ("NVIDIA L40S", "L40S", 362.0),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA A10", "A10", 125.0),
    ("NVIDIA H20", "H20", 148.0),
    ("NVIDIA H800", "H800", 1979 / 2),
    ("NVIDIA H800 PCIe", "H800 PCIe", 1513 / 2),  # the H100 PCIe's compute, not the SXM's
]


@pytest.mark.parametrize("name,label,tflops", NAMES)
def test_device_names_map_to_their_own_peak(name, label, tflops):
    assert lookup_peak_tflops(name) == (label, pytest.approx(tflops))


def test_h200_is_not_an_h20_and_l40s_is_not_an_l4():
    assert lookup_peak_tflops("NVIDIA H200")[0] == "H200 SXM"
    assert lookup_peak_tflops("NVIDIA L40S")[0] == "L40S"
    assert lookup_peak_tflops("NVIDIA A100-SXM4-40GB")[0] == "A100"


@pytest.mark.parametrize("name,whole,slices", [
    ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 1979 / 2, 3),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 1979 / 2, 1),
    ("NVIDIA A100-SXM4-80GB MIG 7g.80gb", 312.0, 7),
])
def test_a_mig_slice_gets_its_share_of_the_peak(name, whole, slices):
    peak = resolve_peak(None, name)
    assert peak.flops == pytest.approx(whole * 1e12 * slices / 7)  # g of the 7 compute slices
    assert "MIG" in peak.source


def test_unknown_device_gives_no_mfu_and_says_why():
    peak = resolve_peak(None, "NVIDIA GeForce RTX 3090")
    assert peak.flops is None
    assert "not in the peak table" in peak.describe() and "logging.peak_tflops" in peak.describe()
    assert resolve_peak(None, None).flops is None  # CPU


def test_recipe_value_wins_over_the_table():
    peak = resolve_peak(790.0, "NVIDIA H200")
    assert peak.flops == 790e12
    assert "logging.peak_tflops" in peak.describe() and "790" in peak.describe()


def test_table_peak_names_the_device():
    peak = resolve_peak(None, "NVIDIA H200")
    assert peak.flops == pytest.approx(989.5e12)
    assert "H200 SXM" in peak.describe() and "NVIDIA H200" in peak.describe()


def test_recipe_key_is_checked(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("logging:\n  peak_tflops: 790\n")
    assert load_recipe(str(path)).logging.peak_tflops == 790.0
    with pytest.raises(ConfigError, match="logging.peak_tflops"):
        load_recipe(str(path), ["logging.peak_tflops=-1"])
