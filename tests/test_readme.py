"""README.md's examples run as written: each ```python block of the "Use" section, in a fresh interpreter the way
a new user runs it (no Triton interpreter switched on, so on a CPU every op takes its PyTorch reference)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _use_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("\n## Use\n"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_use_section_has_its_examples():
    assert len(_use_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_use_blocks())))
def test_readme_example_runs_as_written(index, tmp_path):
    script = tmp_path / f"example_{index}.py"
    script.write_text(_use_blocks()[index])
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=900)
    assert result.returncode == 0, f"README example {index} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
