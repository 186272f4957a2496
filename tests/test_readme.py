"""README.md's examples run as written: each ```python block of the "Use" sections, in a fresh interpreter the way
a new user runs it (no Triton interpreter switched on, so on a CPU every op takes its PyTorch reference)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


SECTIONS = ("Use", "Use with diffusers and transformers")


def _section(title: str) -> str:
    text = README.read_text()
    section = text[text.index(f"\n## {title}\n"):]
    return section[:section.index("\n## ", 1)]


def _use_blocks() -> list[str]:
    return [block for title in SECTIONS for block in re.findall(r"```python\n(.*?)```", _section(title), flags=re.S)]


def test_the_use_sections_have_their_examples():
    assert [len(re.findall(r"```python\n", _section(title))) for title in SECTIONS] == [3, 1]


@pytest.mark.parametrize("index", range(len(_use_blocks())))
def test_readme_example_runs_as_written(index, tmp_path):
    script = tmp_path / f"example_{index}.py"
    script.write_text(_use_blocks()[index])
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=900)
    assert result.returncode == 0, f"README example {index} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
