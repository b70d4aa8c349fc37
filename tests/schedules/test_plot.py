"""The plot helper writes a PNG for schedules, schedulers and plain functions."""

import torch

from steepest import schedules as S


def test_plot_writes_png(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    path = S.plot_schedules({"cosine": S.Cosine(total=200, warmup=20), "wsd": S.wsd(opt, total=200, warmup=20),
                             "1cycle": S.one_cycle(opt, total=200, max_lr=0.1), "inv": lambda t: 1 / (1 + t) ** 0.5},
                            tmp_path / "lr.png", title="schedules")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert S.schedule_values(S.LinearDecay(total=4), 4).tolist() == [1.0, 0.75, 0.5, 0.25]
