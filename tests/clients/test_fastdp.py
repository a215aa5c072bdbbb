"""The fast DP path against Opacus's reference: same clipped sum, same noise, same mechanism."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.layers import DPLSTM
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from clients.fastdp.clipper import FastClipper
from clients.fastdp.engine import make_private
from clients.fastdp.lstm import FastDPLSTM
from clients.fastdp.per_example import MATERIALIZE_LIMIT
from clients.train import encode
from models import build_model
from tests.factories import TINY_FAMILIES, tiny_family_spec, toy_data


def deterministic_model(family: str) -> nn.Module:
    """The tiny family model in float64 with dropout off, so two paths see one function."""
    torch.manual_seed(0)
    model = build_model(tiny_family_spec(family)).double().train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def as_model_dtype(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Float inputs (sentence vectors) in float64 like the model; ids stay integers."""
    return tuple(t.double() if t.is_floating_point() else t for t in tensors)


def opacus_reference(
    model: nn.Module, batch: tuple[torch.Tensor, ...], clip: float | None
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Opacus hooks + DPOptimizer without noise: per-example norms and the clipped sum.

    ``clip=None`` picks the median per-example norm, so some examples are clipped and
    some are not. Runs on a deep copy; returns (norms, clipped sums, clip).
    """
    import copy

    *inputs, labels = batch
    ref = copy.deepcopy(model)
    params = [p for p in ref.parameters() if p.requires_grad]
    gsm = GradSampleModule(ref)
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=len(labels),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        F.cross_entropy(gsm(*inputs), labels).backward()
    per_param = [p.grad_sample.reshape(len(labels), -1).norm(dim=1) for p in opt.params]
    norms = torch.stack(per_param, 1).norm(dim=1)
    opt.max_grad_norm = float(norms.median()) if clip is None else clip
    opt.clip_and_accumulate()
    sums = [p.summed_grad.detach().clone() for p in opt.params]
    gsm._close()
    return norms, sums, opt.max_grad_norm


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x = torch.cat([t.flatten() for t in a])
    y = torch.cat([t.flatten() for t in b])
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("limit", [MATERIALIZE_LIMIT, 0], ids=["materialized", "ghost"])
@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_fast_clipped_sum_equals_opacus_reference(family: str, limit: int) -> None:
    spec = tiny_family_spec(family)
    model = deterministic_model(family)
    batch = as_model_dtype(encode(toy_data(12), spec).tensors)
    *inputs, labels = batch
    ref_norms, ref_sums, clip = opacus_reference(model, batch, clip=None)
    assert (ref_norms > clip).any() and (ref_norms < clip).any()  # both regimes exercised

    with FastClipper(model, clip, materialize_limit=limit) as clipper:
        norms = clipper.backward(F.cross_entropy(model(*inputs), labels, reduction="none"))
    fast_sums = [p.grad for p in model.parameters() if p.requires_grad]

    assert rel_err([norms], [ref_norms]) < 1e-10
    assert rel_err(fast_sums, ref_sums) < 1e-5  # the bar; float64 gives ~1e-15
    for p, ref in zip(fast_sums, ref_sums, strict=True):
        assert torch.allclose(p, ref, rtol=1e-6, atol=1e-9)
    # The model is left as built: Opacus's DPLSTM back in place, no hooks behind.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    if family == "lstm":
        assert isinstance(model.get_submodule("lstm"), DPLSTM)


def test_float32_fast_path_is_within_1e_5_of_opacus() -> None:
    spec = tiny_family_spec("lstm")
    model = deterministic_model("lstm").float()
    *inputs, labels = as_model_dtype(encode(toy_data(16), spec).tensors)
    _, ref_sums, clip = opacus_reference(model, (*inputs, labels), clip=None)
    with FastClipper(model, clip) as clipper:
        clipper.backward(F.cross_entropy(model(*inputs), labels, reduction="none"))
    assert rel_err([p.grad for p in model.parameters() if p.requires_grad], ref_sums) < 1e-5


def test_fast_lstm_computes_what_dplstm_computes() -> None:
    torch.manual_seed(1)
    lstm = DPLSTM(5, 4, batch_first=True, bidirectional=True).double()
    fast = FastDPLSTM(lstm)
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 7, 8, dtype=torch.float64)
    out_ref, (h_ref, c_ref) = lstm(x)
    (dx_ref,) = torch.autograd.grad((out_ref * weights).sum(), x)
    out, (h_n, c_n) = fast(x)
    (dx,) = torch.autograd.grad((out * weights).sum(), x)
    assert torch.allclose(out, out_ref, atol=1e-12)
    assert torch.allclose(h_n, h_ref, atol=1e-12) and torch.allclose(c_n, c_ref, atol=1e-12)
    assert torch.allclose(dx, dx_ref, atol=1e-12)


def test_noise_has_std_sigma_times_clip_on_every_parameter() -> None:
    """Through the same wiring train_dp uses: Opacus's optimizer noises the fast clipped sum.

    After ``pre_step`` each gradient is (clipped sum + noise) / expected batch size, so
    noise = grad * E - clipped sum. For N i.i.d. normal draws the sample standard deviation
    has standard error sigma / sqrt(2N) and the mean sigma / sqrt(N); the bounds are 5
    standard errors (the seed is fixed, so this does not flake). Noise on the mean instead of
    the sum, or a wrong sigma or C, misses by orders of magnitude more.
    """
    sigma, clip = 0.8, 0.5
    spec = tiny_family_spec("lstm")
    torch.manual_seed(0)
    model = build_model(spec).train()
    dataset = encode(toy_data(30), spec)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine(accountant="prv", secure_mode=False)
    dp_optimizer, dp_loader = make_private(
        engine,
        optimizer=torch.optim.SGD(params, lr=0.0),
        data_loader=DataLoader(dataset, batch_size=10),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        noise_generator=torch.Generator().manual_seed(7),
    )
    expected = dp_optimizer.expected_batch_size
    assert expected == 10 and math.isclose(dp_loader.sample_rate, 1 / 3)
    *inputs, labels = as_model_dtype(dataset.tensors)
    with FastClipper(model, clip) as clipper:
        clipper.backward(F.cross_entropy(model(*inputs), labels, reduction="none"))
    clean = [p.grad.clone() for p in params]
    assert dp_optimizer.pre_step()
    noise = torch.cat(
        [(p.grad * expected - c).flatten() for p, c in zip(params, clean, strict=True)]
    )
    n = noise.numel()
    assert n > 4000
    target = sigma * clip
    assert abs(float(noise.std()) / target - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 5 * target / math.sqrt(n)
    # Every parameter got noise, and the accountant saw exactly this one step.
    assert all(not torch.equal(p.grad * expected, c) for p, c in zip(params, clean, strict=True))
    assert engine.accountant.history == [(sigma, 1 / 3, 1)]


def test_empty_poisson_batch_is_a_pure_noise_step() -> None:
    spec = tiny_family_spec("lstm")
    model = build_model(spec).train()
    with FastClipper(model, 1.0) as clipper:
        clipper.zero_batch()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


def test_unsupported_trainable_module_is_refused_clearly() -> None:
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Conv1d '0'.*Use engine='opacus'"):
        FastClipper(model, 1.0)


def test_module_reused_in_one_forward_is_refused() -> None:
    layer = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(self.layer(x))

    model = Twice()
    with FastClipper(model, 1.0), pytest.raises(ValueError, match="ran twice"):
        model(torch.randn(2, 3))


def test_clip_norm_must_be_positive() -> None:
    with pytest.raises(ValueError, match="clipping norm should be a positive value"):
        FastClipper(nn.Linear(2, 2), 0.0)
