"""The README's example runs as written and trains."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    first = scope["torch"].nn.functional.cross_entropy(scope["model"](scope["x"]), scope["y"])
    assert scope["opt"].state, "the optimizer took steps"
    assert first.item() < 2.0, "100 AdamW steps on 256 points bring the loss well below log(10) = 2.3"
