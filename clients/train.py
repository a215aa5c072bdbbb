"""Plain training code (no Flower imports): DP-SGD with Opacus (example- and user-level),
and non-private reference training. The DP plumbing shared by both DP paths is
``clients.dp_steps``; evaluation is ``clients.evaluate``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from clients.data import LabeledData, bound_users
from clients.dp_steps import (
    FastStep,
    OpacusStep,
    Step,
    applied_params,
    privacy_engine_for,
    proximal_pull,
)
from clients.fastdp.clipper import FastClipper
from clients.fastdp.engine import make_private
from clients.fastdp.poisson import poisson_loader
from clients.features import model_inputs
from models import ModelSpec
from privacy.params import DPParams, dp_batch_size, poisson_schedule


@dataclass(frozen=True)
class TrainResult:
    examples: int
    loss: float
    accuracy: float
    applied: DPParams  # what the optimizer actually applied, read back from Opacus
    # privacy-unit user: the users trained on, and rows left out by the bound k.
    users: int = 0
    left_out: int = 0


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1', 'auto' or None): CUDA when present by default."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {requested!r} was requested but CUDA is not available here.")
    return device


def make_optimizer(params: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
    """Adam. Under DP it sees only the clipped, noised gradient (post-processing, no
    privacy cost); its per-coordinate scaling is what lets the LSTM learn from MiniLM's
    small frozen embeddings, where SGD with momentum stayed at the majority class."""
    return torch.optim.Adam(params, lr=learning_rate)


def _prepare(
    model: nn.Module,
    data: LabeledData,
    spec: ModelSpec,
    batch_size: int,
    seed: int | None,
    device: torch.device | None,
) -> tuple[torch.device, DataLoader, list[nn.Parameter]]:
    """Device, shuffled loader and trainable parameters, shared by both training paths."""
    device = device or pick_device()
    if seed is not None:
        torch.manual_seed(seed)
    model.to(device).train()
    loader = DataLoader(encode(data, spec, device), batch_size=batch_size, shuffle=True)
    return device, loader, [p for p in model.parameters() if p.requires_grad]


def encode(data: LabeledData, spec: ModelSpec, device: torch.device | None = None) -> TensorDataset:
    """The model's inputs for ``data`` followed by its labels (one tensor each).

    For the encoder-head family the inputs are the node's cached sentence vectors.
    """
    inputs = model_inputs(data, spec, device=device)
    return TensorDataset(*inputs, torch.tensor(data.labels, dtype=torch.long))


ENGINES = ("fast", "opacus")


def train_dp(
    model: nn.Module,
    data: LabeledData,
    spec: ModelSpec,
    dp: DPParams,
    *,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    secure_mode: bool = True,
    seed: int | None = None,
    device: torch.device | None = None,
    proximal_mu: float = 0.0,
    engine: str = "fast",
) -> TrainResult:
    """Train ``model`` in place with DP-SGD at exactly the parameters in ``dp``.

    The caller's ``dp`` must match the Poisson schedule of this data; a mismatch is
    refused here rather than silently spending a different budget.

    ``engine`` picks how the clipped sum of per-example gradients is computed: "fast"
    (clients/fastdp/: one backward, per-example norms from layer inputs and output
    gradients) or "opacus" (Opacus's per-example gradient hooks, the reference). Both use
    Opacus's Poisson sampler, noise, and PRV accountant, so the mechanism is the same.

    With ``proximal_mu`` > 0 (FedProx) each private step is followed by a step on
    mu/2 * ||w - w_global||^2. That term does not touch the data, so applying it
    after the noisy update costs no privacy; putting it in the loss would be wrong,
    as the gradient is replaced by the clipped per-example sum.
    """
    if engine not in ENGINES:
        raise ValueError(f"Unknown DP engine {engine!r}; known: {list(ENGINES)}.")
    batch_size = dp_batch_size(len(data), batch_size)  # 0: sized by the data, as planned
    sample_rate, steps = poisson_schedule(len(data), batch_size, epochs)
    planned = DPParams(dp.noise_multiplier, sample_rate, steps, dp.clip_norm, dp.delta)
    if not planned.matches(dp):
        raise ValueError(
            f"DP plan does not fit the local data: asked sample rate {dp.sample_rate:.6g} and "
            f"{dp.steps} steps, local schedule gives {sample_rate:.6g} and {steps}."
        )
    device, loader, trainable = _prepare(model, data, spec, batch_size, seed, device)
    anchor = [p.detach().clone() for p in trainable] if proximal_mu > 0 else None
    optimizer = make_optimizer(trainable, learning_rate)
    privacy_engine, noise_generator, sampler_generator = privacy_engine_for(secure_mode, device)
    # Poisson sampling exactly as planned: the plan's sample rate and steps per epoch set
    # on Opacus's sampler (never derived back from 1 / q), drawn by an OS-seeded generator.
    poisson = poisson_loader(
        loader, sample_rate=dp.sample_rate, steps=dp.steps // epochs, generator=sampler_generator
    )
    step: Step
    if engine == "opacus":
        dp_model, dp_optimizer, dp_loader = privacy_engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=poisson,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clip_norm,
            poisson_sampling=False,  # ``poisson`` already samples; Opacus keeps it as is
            noise_generator=noise_generator,
        )
        step = OpacusStep(dp_model, dp_optimizer)
    else:
        dp_optimizer, dp_loader = make_private(
            privacy_engine,
            optimizer=optimizer,
            data_loader=poisson,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clip_norm,
            noise_generator=noise_generator,
        )
        step = FastStep(FastClipper(model, dp.clip_norm), model)
    total_loss, correct, seen = 0.0, 0, 0
    with step:
        for _ in range(epochs):
            for *batch, labels in dp_loader:
                dp_optimizer.zero_grad(set_to_none=True)
                if len(labels) == 0:
                    # An empty Poisson batch still takes a (pure noise) step, as accounted.
                    step.empty()
                    dp_optimizer.step()
                    continue
                inputs = tuple(t.to(device) for t in batch)
                labels = labels.to(device)
                logits, loss = step.backward(inputs, labels)
                dp_optimizer.step()
                if anchor is not None:
                    proximal_pull(trainable, anchor, learning_rate * proximal_mu)
                total_loss += float(loss) * len(labels)
                correct += int((logits.argmax(-1) == labels).sum())
                seen += len(labels)
    applied = applied_params(privacy_engine, dp_optimizer.max_grad_norm, dp.delta)
    return TrainResult(
        examples=len(data),
        loss=total_loss / max(seen, 1),
        accuracy=correct / max(seen, 1),
        applied=applied,
    )


def user_schedule(num_users: int, batch_size: int, epochs: int) -> tuple[int, float, int]:
    """Expected users per batch, sample rate and steps of user-level DP-SGD: the example
    schedule with users as the unit (q = expected users per batch / users)."""
    batch = dp_batch_size(num_users, batch_size)
    return (batch, *poisson_schedule(num_users, batch, epochs))


def train_dp_users(
    model: nn.Module,
    data: LabeledData,
    spec: ModelSpec,
    dp: DPParams,
    *,
    max_examples_per_user: int,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    secure_mode: bool = True,
    seed: int | None = None,
    device: torch.device | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """User-level DP-SGD: ``dp`` protects every user (all rows with one user-column value).

    Each user keeps at most ``max_examples_per_user`` rows (``bound_users``); Opacus's
    Poisson sampler draws *users* at ``dp.sample_rate`` (expected ``batch_size`` users per
    step); a sampled user's rows go through the model together, their per-example gradients
    are averaged and that mean is clipped to ``dp.clip_norm`` as one contribution
    (``FastClipper.backward(..., groups)``); Opacus adds N(0, (sigma C)^2) to the sum over
    users and divides by the expected users per step, and its accountant records each
    step at the user sample rate. Adding or removing one user changes the clipped sum by
    at most C: the subsampled Gaussian mechanism with users as the unit, so the same
    accountant and planner apply with n = the number of users.
    """
    bounded, left_out = bound_users(data, max_examples_per_user, seed or 0)
    assert bounded.users is not None
    names = sorted(set(bounded.users))
    index = {u: i for i, u in enumerate(names)}
    owner = torch.tensor([index[u] for u in bounded.users], dtype=torch.long)
    _, sample_rate, steps = user_schedule(len(names), batch_size, epochs)
    planned = DPParams(dp.noise_multiplier, sample_rate, steps, dp.clip_norm, dp.delta)
    if not planned.matches(dp):
        raise ValueError(
            f"DP plan does not fit the local users: asked sample rate {dp.sample_rate:.6g} "
            f"and {dp.steps} steps, {len(names)} users give {sample_rate:.6g} and {steps}."
        )
    device = device or pick_device()
    if seed is not None:
        torch.manual_seed(seed)
    model.to(device).train()
    encoded = encode(bounded, spec, device).tensors
    inputs_all, labels_all = encoded[:-1], encoded[-1]
    order = torch.argsort(owner, stable=True)
    lengths = torch.bincount(owner, minlength=len(names))
    rows_of = list(torch.split(order, lengths.tolist()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in trainable] if proximal_mu > 0 else None
    optimizer = make_optimizer(trainable, learning_rate)
    privacy_engine, noise_generator, sampler_generator = privacy_engine_for(secure_mode, device)
    users = TensorDataset(torch.arange(len(names)))
    poisson = poisson_loader(
        DataLoader(users, batch_size=max(1, round(1 / dp.sample_rate))),
        sample_rate=dp.sample_rate,
        steps=dp.steps // epochs,
        generator=sampler_generator,
    )
    # Noise is divided by int(users * q), the expected users per step.
    dp_optimizer, dp_loader = make_private(
        privacy_engine,
        optimizer=optimizer,
        data_loader=poisson,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clip_norm,
        noise_generator=noise_generator,
    )
    clipper = FastClipper(model, dp.clip_norm)
    total_loss, correct, seen = 0.0, 0, 0
    with clipper:
        for _ in range(epochs):
            for (picked,) in dp_loader:
                dp_optimizer.zero_grad(set_to_none=True)
                if len(picked) == 0:
                    clipper.zero_batch()  # an empty Poisson batch: a pure-noise step
                    dp_optimizer.step()
                    continue
                rows = torch.cat([rows_of[int(u)] for u in picked])
                groups = torch.repeat_interleave(
                    torch.arange(len(picked)), lengths[picked.long()]
                ).to(device)
                rows = rows.to(labels_all.device)
                labels = labels_all[rows].to(device)
                logits = model(*(t[rows].to(device) for t in inputs_all))
                losses = F.cross_entropy(logits, labels, reduction="none")
                clipper.backward(losses, groups)
                dp_optimizer.step()
                if anchor is not None:
                    proximal_pull(trainable, anchor, learning_rate * proximal_mu)
                total_loss += float(losses.detach().sum())
                correct += int((logits.detach().argmax(-1) == labels).sum())
                seen += len(labels)
    applied = applied_params(privacy_engine, dp_optimizer.max_grad_norm, dp.delta)
    return TrainResult(
        examples=len(bounded),
        loss=total_loss / max(seen, 1),
        accuracy=correct / max(seen, 1),
        applied=applied,
        users=len(names),
        left_out=left_out,
    )


def train_plain(
    model: nn.Module,
    data: LabeledData,
    spec: ModelSpec,
    *,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    seed: int | None = None,
    device: torch.device | None = None,
) -> float:
    """Non-private training, for reference benchmarks only (never used by the ClientApp).

    Returns the mean training loss of the last epoch.
    """
    batch_size = dp_batch_size(len(data), batch_size)
    device, loader, trainable = _prepare(model, data, spec, batch_size, seed, device)
    optimizer = make_optimizer(trainable, learning_rate)
    criterion = nn.CrossEntropyLoss()
    last = 0.0
    for _ in range(epochs):
        total, seen = 0.0, 0
        for *batch, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(*(t.to(device) for t in batch)), labels.to(device))
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            seen += len(labels)
        last = total / max(seen, 1)
    return last
