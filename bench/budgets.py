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
    ``config`` or whose case name matches the glob ``case``), for the written ``reason``."""

    budget: str
    kernel: str
    reason: str
    config: Optional[str] = None
    case: Optional[str] = None

    def covers(self, budget: str, row: dict) -> bool:
        return (budget == self.budget and fnmatch.fnmatch(row["kernel"], self.kernel)
                and (self.config is None or self.config in row["config"])
                and (self.case is None or fnmatch.fnmatch(row["case"], self.case)))


EXEMPTIONS: tuple[Exemption, ...] = ()


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
    Rows that failed to compile are findings of every budget (nothing can be said to hold for them)."""
    findings = []
    for row in rows:
        for budget in BUDGETS:
            if "compile_error" not in row and (not budget.applies(row) or budget.holds(row)):
                continue
            exemption = next((e for e in exemptions if e.covers(budget.name, row)), None)
            findings.append(Finding(budget, row, exemption))
    return findings
