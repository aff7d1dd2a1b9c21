"""Issue 19, item 15: the README's quickstart block is the output of the current code. One full run of
`examples/quickstart.py` (the README's own command, ~2 minutes on two cores) in a temporary work
directory; its deterministic figures (the run is bit-deterministic on CPU: fixed seeds, one thread per
op order) must equal the README's. Timings and paths are left out: they depend on the machine and the
work directory. When the code changes the figures on purpose, regenerate the block with
`python examples/quickstart.py && python examples/quickstart.py --update-readme`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DETERMINISTIC = ("corpus", "model", "validation loss", "pseudo-perplexity", "masked words", "zero-shot STS",
                 "fill-mask")
TIMEOUT_S = 900  # ~100 s alone on a quiet 2-core machine; the margin is for a CI machine busy with other tests


def figures(lines) -> dict[str, str]:
    rows = {}
    for line in lines:
        name = line[3:21].strip()
        if name in DETERMINISTIC:
            rows[name] = line[21:].strip()
    return rows


def readme_summary() -> list[str]:
    sys.path.insert(0, str(ROOT / "examples"))
    from quickstart import readme_block

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = readme_block(readme)
    return readme[start:end].splitlines()


@pytest.mark.slow
def test_the_readme_quickstart_figures_are_what_the_current_code_prints(tmp_path):
    result = subprocess.run([sys.executable, "examples/quickstart.py", "--workdir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads((tmp_path / "summary.json").read_text())["summary_lines"]
    want, got = figures(readme_summary()), figures(printed)
    assert set(got) == set(DETERMINISTIC)
    assert got == want, ("the README's quickstart figures drifted; regenerate them with `python examples/quickstart.py "
                         "&& python examples/quickstart.py --update-readme`")
