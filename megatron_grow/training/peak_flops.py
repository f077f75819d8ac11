"""Peak dense bf16 FLOP/s per accelerator, for MFU = achieved model FLOP/s / peak.

The figures are the vendor's dense (no 2:4 sparsity) bf16 tensor-core peaks; NVIDIA's data
sheets print the sparse figure, twice these. Sources: NVIDIA H100 data sheet (SXM / PCIe / NVL
1,979 / 1,513 / 1,671 TFLOPS bf16 with sparsity, so 989.5 / 756.5 / 835.5 dense), H200 data
sheet (SXM 1,979, NVL 1,671 with sparsity: the H100's compute with more memory), A100 data
sheet (312 dense, SXM and PCIe), HGX
B200/B100 and GB200 NVL72 specifications (2.25 / 1.75 / 2.5 PFLOPS dense per GPU), L40S
data sheet (362), L4 data sheet (121), A10 data sheet (125), H20 (148, NVIDIA's China
part list), H800/A800 (export variants with the H100 SXM / A100 compute; the H800 PCIe has the
H100 PCIe's 1,513 sparse, so 756.5 dense).

A MIG slice (``"NVIDIA H100 80GB HBM3 MIG 3g.40gb"``) has ``g`` of the GPU's 7 compute slices:
its peak is ``g/7`` of the whole GPU's.

The table is matched against ``torch.cuda.get_device_name()`` (``"NVIDIA H100 80GB HBM3"``,
``"NVIDIA H100 PCIe"``, ``"NVIDIA H200"``, ``"NVIDIA A100-SXM4-80GB"``, ``"NVIDIA B200"``, ...),
most specific pattern first. A recipe value (``logging.peak_tflops``) wins over the table,
so a measured ceiling or an unlisted device can be used instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIG_COMPUTE_SLICES = 7  # A100 / H100 / H200 / B200: a MIG "Ng" profile holds N of 7 compute slices
DEFAULT_GPU = "H100 SXM"  # what plans and estimates assume when no GPU is named

# (pattern on the device name, label, dense bf16 TFLOP/s); first match wins, so variants come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"\bGB200\b", "GB200", 2500.0),
    (r"\bB200\b", "B200", 2250.0),
    (r"\bB100\b", "B100", 1750.0),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835.5),
    (r"\bH200\b", "H200 SXM", 989.5),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.5),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.5),
    (r"\bH100\b", "H100 SXM", 989.5),
    (r"\bH800\b.*\bPCIe\b", "H800 PCIe", 756.5),
    (r"\bH800\b", "H800", 989.5),
    (r"\bH20\b", "H20", 148.0),
    (r"\bA100\b", "A100", 312.0),
    (r"\bA800\b", "A800", 312.0),
    (r"\bL40S\b", "L40S", 362.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10\b", "A10", 125.0),
)


@dataclass(frozen=True)
class PeakFlops:
    """The peak MFU is measured against, and where it came from (printed with every MFU)."""

    flops: float | None
    source: str

    def describe(self) -> str:
        if self.flops is None:
            return f"MFU not computed: {self.source}"
        return f"peak {self.flops / 1e12:g} TFLOP/s ({self.source})"


def lookup_peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 TFLOP/s) for a device name, or None when the table has no entry."""
    for pattern, label, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return label, tflops
    return None


def resolve_peak(configured_tflops: float | None, device_name: str | None) -> PeakFlops:
    """The recipe's value if set, else the table entry for ``device_name`` (None: not a GPU)."""
    if configured_tflops is not None:
        return PeakFlops(configured_tflops * 1e12, "logging.peak_tflops from the recipe")
    if device_name is None:
        return PeakFlops(None, "no GPU; set logging.peak_tflops to compute it anyway")
    found = lookup_peak_tflops(device_name)
    if found is None:
        return PeakFlops(None, f"'{device_name}' is not in the peak table; set logging.peak_tflops")
    label, tflops = found
    mig = re.search(r"\bMIG\s+(\d+)g\.", device_name, flags=re.IGNORECASE)
    if mig:  # a slice of the GPU: its share of the compute slices, not the whole GPU's peak
        slices = int(mig.group(1))
        return PeakFlops(tflops * 1e12 * slices / MIG_COMPUTE_SLICES,
                         f"{label} dense bf16 x {slices}/{MIG_COMPUTE_SLICES} (MIG slice), looked up from "
                         f"'{device_name}'")
    return PeakFlops(tflops * 1e12, f"{label} dense bf16, looked up from '{device_name}'")


def current_device_peak(configured_tflops: float | None) -> PeakFlops:
    """:func:`resolve_peak` for this process's CUDA device (or none)."""
    import torch  # lazy (cost): `megatron-grow plan`'s parser imports this module; torch takes ~2 s

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return resolve_peak(configured_tflops, name)


__all__ = ["PEAK_BF16_TFLOPS", "PeakFlops", "lookup_peak_tflops", "resolve_peak", "current_device_peak"]
