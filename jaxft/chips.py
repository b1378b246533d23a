"""Accelerator chips: memory and peak rates from the vendors' spec sheets (dense, no sparsity), for MFU
(`jaxft bench`) and for fit and roofline estimates (`jaxft plan`).

TPU figures are per chip (one JAX device on v4 and later), from cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}
("Key chip specifications"); GPU figures from NVIDIA's data sheets (H100 / H200 SXM, A100 SXM, L4).
TPUs run float32 matmuls as several bf16 passes: their float32 peak is taken as a quarter of bf16.
"""
import dataclasses

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # what `jaxft plan` prints, e.g. "TPU v5p"
  hbm_bytes: int
  bf16_flops: float  # peak FLOP/s
  f32_flops: float
  hbm_bytes_per_s: float
  source: str

  def peak(self, dtype: str) -> float:
    return self.bf16_flops if dtype == "bfloat16" else self.f32_flops


# device_kind (as jax reports it; matched longest first) -> Chip
CHIPS = {
    "TPU v4": Chip("TPU v4", 32 * GiB, 275e12, 275e12 / 4, 1200e9, "cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("TPU v5e", 16 * GiB, 197e12, 197e12 / 4, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("TPU v5p", 95 * GiB, 459e12, 459e12 / 4, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("TPU v6e", 32 * GiB, 918e12, 918e12 / 4, 1640e9, "cloud.google.com/tpu/docs/v6e"),
    "H100": Chip("H100 SXM", 80 * GiB, 989e12, 67e12, 3350e9, "NVIDIA H100 data sheet (fp32 without TF32)"),
    "H200": Chip("H200 SXM", 141 * GiB, 989e12, 67e12, 4800e9, "NVIDIA H200 data sheet (fp32 without TF32)"),
    "A100": Chip("A100 SXM", 80 * GiB, 312e12, 19.5e12, 2039e9, "NVIDIA A100 data sheet"),
    "L4": Chip("L4", 24 * GiB, 121e12, 30e12, 300e9, "NVIDIA L4 data sheet"),
}


def chip(device_kind: str) -> Chip | None:
  """The spec of a jax device_kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), None if unknown."""
  for name in sorted(CHIPS, key=len, reverse=True):
    if name.lower() in device_kind.lower():
      return CHIPS[name]
  return None
