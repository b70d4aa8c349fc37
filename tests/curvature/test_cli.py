import json

import pytest

from steepest.curvature.cli import main


def test_curvature_command_writes_plots(tmp_path, capsys):
    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 4))\n")
    out = tmp_path / "out"
    code = main(["curvature", f"{tmp_path / 'net.py'}:make", "--data", "blobs", "--max-examples", "96",
                 "--batch-size", "48", "--top-k", "2", "--density-steps", "8", "--density-probes", "2",
                 "--points", "5", "--max-probes", "12", "--dtype", "float64", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "top 2 eigenvalues" in text and "trace" in text
    for name in ("density.png", "landscape.png", "curvature.json"):
        assert (out / name).stat().st_size > 0
    result = json.loads((out / "curvature.json").read_text())
    assert result["parameters"] == 32 * 8 + 8 + 8 * 4 + 4 and len(result["top_eigenvalues"]) == 2


def test_curvature_command_bad_model_spec(tmp_path):
    with pytest.raises(SystemExit, match="module:name"):
        main(["curvature", "no_colon_here", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        main(["curvature", str(tmp_path / "missing.py") + ":make", "--out", str(tmp_path)])
