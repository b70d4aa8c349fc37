import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from steepest import curvature as C

DT = torch.float64


def _data(n=6):
    return torch.randn(n, 3, dtype=DT), torch.randn(n, 1, dtype=DT)


def test_no_trainable_parameters():
    model = nn.Linear(3, 1).double().requires_grad_(False)
    with pytest.raises(C.CurvatureError, match="no trainable parameters"):
        C.hessian(model, nn.MSELoss(), _data())
    with pytest.raises(C.CurvatureError, match="no trainable parameters"):
        C.hessian(nn.ReLU(), nn.MSELoss(), _data())


def test_loss_not_scalar():
    model = nn.Linear(3, 1).double()
    H = C.hessian(model, nn.MSELoss(reduction="none"), _data())
    with pytest.raises(C.CurvatureError, match="scalar"):
        H @ torch.ones(H.shape[0], dtype=DT)


def test_mismatched_data():
    model = nn.Linear(3, 1).double()
    X, Y = _data()
    with pytest.raises(C.CurvatureError, match="inputs have 6 examples but targets have 4"):
        C.hessian(model, nn.MSELoss(), [(X, Y[:4])]) @ torch.ones(4, dtype=DT)
    with pytest.raises(C.CurvatureError, match="model failed on inputs"):
        C.hessian(model, nn.MSELoss(), [(torch.randn(6, 5, dtype=DT), Y)]) @ torch.ones(4, dtype=DT)
    with pytest.raises(C.CurvatureError, match="loss_fn failed"):
        C.hessian(model, nn.CrossEntropyLoss(), [(X, torch.zeros(6, 2, 2))]) @ torch.ones(4, dtype=DT)
    with pytest.raises(C.CurvatureError, match="pair"):
        C.hessian(model, nn.MSELoss(), [X]) @ torch.ones(4, dtype=DT)
    with pytest.raises(C.CurvatureError, match="no batches"):
        C.hessian(model, nn.MSELoss(), []) @ torch.ones(4, dtype=DT)
    H = C.hessian(model, nn.MSELoss(), (X, Y))
    with pytest.raises(C.CurvatureError, match="length 5"):
        H @ torch.ones(5, dtype=DT)


class _InplaceTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h.mul_(2.0)  # tanh saved its output for backward: in-place breaks differentiation
        return h


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class _OnceDiff(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return _Cube.apply(self.lin(x))


@pytest.mark.parametrize("model_cls", [_InplaceTanh, _OnceDiff])
@pytest.mark.parametrize("make", [C.hessian, C.ggn])
def test_not_twice_differentiable(model_cls, make):
    model = model_cls().double()
    op = make(model, nn.MSELoss(), _data())
    with pytest.raises(C.NotTwiceDifferentiableError, match="twice-differentiable"):
        op @ torch.ones(op.shape[0], dtype=DT)


def test_detached_model():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x).detach()

    op = C.hessian(Detached().double(), nn.MSELoss(), _data())
    with pytest.raises(C.CurvatureError, match="does not depend"):
        op @ torch.ones(op.shape[0], dtype=DT)


def test_bad_arguments():
    model = nn.Linear(3, 1).double()
    with pytest.raises(C.CurvatureError, match="no parameter named"):
        C.hessian(model, nn.MSELoss(), _data(), params=["nope"])
    with pytest.raises(C.CurvatureError, match="predictive distribution"):
        C.fisher(model, lambda o, t: ((o - t) ** 4).mean(), _data(), kind="true")
    with pytest.raises(C.CurvatureError, match="kind"):
        C.fisher(model, nn.MSELoss(), _data(), kind="exact")
    H = C.hessian(model, nn.MSELoss(), _data())
    with pytest.raises(C.CurvatureError, match="k must be"):
        C.top_eigenvalues(H, k=10)
    with pytest.raises(C.CurvatureError, match="which"):
        C.top_eigenvalues(H, which="middle")
