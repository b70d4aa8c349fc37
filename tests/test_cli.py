"""The steepest command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import steepest
from steepest.cli import main, methods_table


def test_list_prints_every_registered_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for info in steepest.methods():
        assert info.name in out
    assert f"{len(steepest.methods())} methods" in out


def test_list_markdown_writes_the_table(tmp_path):
    target = tmp_path / "methods.md"
    assert main(["list", "--markdown", str(target)]) == 0
    text = target.read_text()
    assert text.count("\n|") >= len(steepest.methods()) + 1


def test_committed_methods_doc_is_current():
    doc = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
    assert methods_table(markdown=True) in doc.read_text(), "run `steepest list --markdown` and commit docs/methods.md"


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "steepest.cli", "list"], capture_output=True, text=True, check=True)
    assert "adamw" in out.stdout
