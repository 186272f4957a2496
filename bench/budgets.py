"""Compiled-code budgets: what every benchmark launch's machine code must show, as data.

Each :class:`Budget` says which report rows it applies to and what must hold for them (rows come from
:mod:`genkernels.bench.resources`). An :class:`Exemption` lifts one budget for the kernels it names, with the
reason written down; exemptions show in the report and in the test that holds the budgets
(``tests/test_compiled_code.py``), so an exempted kernel is never mistaken for one that meets its budget.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Optional


def _uses_mma(row: dict) -> bool:
    return row["hgmma"] + row["hmma"] > 0


def _sixteen_bit(row: dict) -> bool:
    return any(dtype in ("fp16", "bf16") for dtype in row["dot_dtypes"])


def _memory_bound(row: dict) -> bool:
    """No tensor-core instruction: the kernel's floor is its traffic."""
    return not _uses_mma(row)


@dataclasses.dataclass(frozen=True)
class Budget:
    name: str
    rule: str  # what must hold, in words
    applies: Callable[[dict], bool]
    holds: Callable[[dict], bool]


BUDGETS = (
    Budget("no_spills", "no stack frame (spills) and no local-memory loads or stores",
           lambda row: True,
           lambda row: row["stack_bytes"] == 0 and row["local_loads"] == 0 and row["local_stores"] == 0),
    Budget("wide_global_access", "memory-bound kernels load and store 16 bytes per thread (LDG/STG.E.128)",
           _memory_bound,
           lambda row: "16" in row["global_load_widths"]
           and (not row["global_store_widths"] or "16" in row["global_store_widths"])),
    Budget("warpgroup_mma", "fp16/bf16 dot kernels use warpgroup MMA (HGMMA) and no mma.sync (HMMA) on sm_90",
           lambda row: row["arch"] == "sm_90" and _uses_mma(row) and _sixteen_bit(row),
           lambda row: row["hgmma"] > 0 and row["hmma"] == 0),
    Budget("occupancy", "memory-bound kernels keep at least 2 CTAs or 16 warps resident per SM",
           _memory_bound,
           lambda row: row["ctas_per_sm"] >= 2 or row["ctas_per_sm"] * row["num_warps"] >= 16),
    Budget("wave_efficiency", "grids under 4 waves fill at least 90% of their last wave's slots",
           lambda row: row["waves"] < 4,
           lambda row: row["wave_efficiency"] >= 0.9),
    Budget("no_div64_in_loops", "no 64-bit integer division or remainder inside a loop",
           lambda row: True,
           lambda row: row["div64_in_loops"] == 0),
    Budget("fits_shared_memory", "shared memory within the per-CTA limit of the architecture compiled for",
           lambda row: True,
           lambda row: row["fits_shared_memory"]),
)


@dataclasses.dataclass(frozen=True)
class Exemption:
    """Lifts ``budget`` for kernels named by the glob ``kernel`` (and, when given, whose config label contains
    ``config``, whose case name matches the glob ``case``, or compiled by a Triton release matching the glob
    ``triton``), for the written ``reason``."""

    budget: str
    kernel: str
    reason: str
    config: Optional[str] = None
    case: Optional[str] = None
    triton: Optional[str] = None

    def applies_to_triton(self, version: str) -> bool:
        """Whether the exemption is meant for launches compiled by Triton ``version``."""
        return self.triton is None or fnmatch.fnmatch(version, self.triton)

    def covers(self, budget: str, row: dict) -> bool:
        return (budget == self.budget and fnmatch.fnmatch(row["kernel"], self.kernel)
                and (self.config is None or self.config in row["config"])
                and (self.case is None or fnmatch.fnmatch(row["case"], self.case))
                and self.applies_to_triton(row.get("triton", "")))


# The budgets the kernels do not meet, each with what the compiled code shows and why. Every entry is a piece of
# work or a limit of the problem: when a kernel is fixed its entry goes, and the test then holds it to the budget.
_MODEL_SIZED = ("a model-sized tensor smaller than one wave of the device: the split stops at one program per unit "
                "of two 16-byte vectors (elementwise kernels) or per query block (attention), so the grid cannot "
                "fill 90% of its one wave")
EXEMPTIONS: tuple[Exemption, ...] = (
    # memory access widths: kernels whose only stores are a few partial sums
    Exemption("wide_global_access", "_group_norm_stats_kernel", "stores only its (count, mean, M2) partials: 3 "
              "fp32 per group and chunk, fewer values than the CTA's 128 threads, so each thread stores one "
              "(STG.E, 4 bytes); its traffic, the read of x, is 16-byte loads"),
    Exemption("wide_global_access", "_group_norm_backward_reduce_kernel", "stores only its partial sums: 2 fp32 "
              "per channel and 2 per group of each chunk (8-256 values), fewer than 4 per thread of the CTA's 128, "
              "so each thread stores one (STG.E, 4 bytes); its traffic, the reads of x and dy, is 16-byte loads"),
    Exemption("wide_global_access", "_diffusion_loss_fwd_kernel", "without a stored gradient (16-bit outputs, or "
              "no gradient needed) its only store is one fp32 partial sum per one-warp program (STG 4x1); its loads "
              "are 16-byte"),
    Exemption("wide_global_access", "_sample_categorical_kernel", "stores one int64 class per row (STG 8 bytes, "
              "one value per program row); its loads are 16-byte (every pass of rows starting on a 16-byte "
              "boundary, every pass but the draw otherwise: the draw's tiles start on a Philox group of 4 classes)"),
    # waves: grids the problem fixes
    Exemption("wave_efficiency", "_sample_categorical_kernel", "one program per row (or block of rows): a sampling "
              "step has 1-192 rows (0.002-0.05 waves); splitting a row's classes across programs needs "
              "cross-program combines of its maximum, every radix pass's counts and the argmax, a launch each (3-19 "
              "per step)"),
    Exemption("wave_efficiency", "_group_norm_*_kernel", "unsplit (FUSED) launches are N*G/K programs fixed by "
              "the problem (1024 at 32x256x64x64: 0.65 of a wave at 12 CTAs/SM; U-Net 2048-8192 programs at 5-32 "
              "CTAs/SM, down to 0.48), and filling the last wave means splitting, a second HBM read of x (3 vs 2 "
              "N*e bytes); split launches are sized to whole waves at group_norm.CTAS_PER_SM, the CTAs/SM triton "
              "3.9 compiles them to (every split launch >= 0.90), which triton 3.6's register counts miss (10 of "
              "16 split launches at 0.70-0.85)"),
    Exemption("wave_efficiency", "_wavenet_step_kernel", "the sampling step runs the layers in sequence in one "
              "launch: each program carries the whole residual chain of up to 16 samples and one 64-wide block of "
              "skip channels (4 CTAs at batch 16, 256 skip channels: 0.03 waves); filling the SMs needs a "
              "grid-wide barrier or one launch per layer (30 per sample)"),
    Exemption("wave_efficiency", "_masked_conv2d_gather_kernel", "cached PixelCNN sampling evaluates one pixel "
              "per step from a crop of at most (p+1) x (2p+1) pixels per sample: grids of 1-112 CTAs (0.001-0.21 of "
              "a wave on 132 SMs); the step is launch-latency-bound and splitting its 16-64-channel reduction would "
              "only add a pass", case="pixelcnn.sample*"),
    Exemption("wave_efficiency", "_decode_combine_kernel", "merges the splits of 2 query heads per 1-warp CTA: "
              "128 CTAs (8 sequences x 32 heads) is 0.03 waves at 32 CTAs/SM, a few KB per CTA; folding it into the "
              "partial kernel needs a cross-CTA completion counter, not done"),
    Exemption("wave_efficiency", "_bias_act_kernel", _MODEL_SIZED, case="vae_gan.dcgan.*"),
    Exemption("wave_efficiency", "_bias_act_kernel", _MODEL_SIZED, case="hf.unet_*"),
    Exemption("wave_efficiency", "_reparameterize_kl_*_kernel", _MODEL_SIZED, case="vae_gan.vae.*"),
    Exemption("wave_efficiency", "_attention_*_kernel", _MODEL_SIZED, case="*.unet_*"),  # ours and diffusers
    # what triton 3.6.0 (the GPU machine's release) compiles differently from the release the tiles were fitted on
    Exemption("no_spills", "_attention_backward_dq_kernel", "triton 3.6 gives the fp32 exact dQ tile (32x16, d64, "
              "4 warps) a 16-byte stack at 96 registers; triton 3.9 compiles it without one", config="IEEE",
              triton="3.6.*"),
    Exemption("wave_efficiency", "_conv_weight_grad_kernel", "the split is sized for the 4 CTAs/SM triton 3.9 "
              "compiles the 16-bit weight gradient to; triton 3.6's 70 registers at 8 warps give 3 (528 CTAs: "
              "1.33 waves, 0.67 of the last)", triton="3.6.*"),
)

# Benchmark cases whose launches cannot be captured on meta tensors, and why (their kernels are captured through
# the op cases of the same kernels).
CAPTURE_GAPS = {
    "vae_gan.vae.*": "trains and samples under torch.autocast, which has no meta device",
    "vae_gan.dcgan.*": "trains and samples under torch.autocast, which has no meta device",
    "gpt.generate*": "generates under torch.autocast, which has no meta device",
    "flows.glow-*": "ActNorm's data-dependent initialization reads a buffer on the host",
    "hf.gpt2_generate*": "transformers' generate reads tensors on the host (its special-token checks and stopping "
                         "criteria call Tensor.item())",
}


def capture_gap(case: str) -> Optional[str]:
    """Why ``case`` cannot be captured, if it is a known gap."""
    return next((reason for pattern, reason in CAPTURE_GAPS.items() if fnmatch.fnmatch(case, pattern)), None)


@dataclasses.dataclass(frozen=True)
class Finding:
    budget: Budget
    row: dict
    exemption: Optional[Exemption]

    def describe(self) -> str:
        row = self.row
        where = f"{row['case']} / {row['kernel']} [{row['config']}] on {row['arch']}"
        status = f"exempt: {self.exemption.reason}" if self.exemption else "VIOLATED"
        return f"{self.budget.name}: {where}: {self.budget.rule}; {status}"


def check_rows(rows: list[dict], exemptions: tuple[Exemption, ...] = EXEMPTIONS) -> list[Finding]:
    """Every (budget, row) where the budget applies and does not hold, with the exemption that covers it if any.
    Rows that failed to compile are findings of every budget (nothing can be said to hold for them); rows compiled
    for their shared memory only face that budget alone."""
    findings = []
    for row in rows:
        for budget in BUDGETS:
            if row.get("shared_memory_only") and budget.name != "fits_shared_memory":
                continue
            if "compile_error" not in row and (not budget.applies(row) or budget.holds(row)):
                continue
            exemption = next((e for e in exemptions if e.covers(budget.name, row)), None)
            findings.append(Finding(budget, row, exemption))
    return findings
