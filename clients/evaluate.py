"""Evaluation of a model on labelled data: loss, accuracy and macro-F1."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from clients.data import LabeledData
from clients.train import encode, pick_device
from models import ModelSpec


@dataclass(frozen=True)
class EvalResult:
    examples: int
    loss: float
    accuracy: float
    macro_f1: float


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Macro-averaged F1 over the classes present in truth or prediction."""
    scores = []
    for c in range(num_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: LabeledData,
    spec: ModelSpec,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> EvalResult:
    """Loss, accuracy and macro-F1 of ``model`` on ``data``."""
    device = device or pick_device()
    model.to(device).eval()
    loader = DataLoader(encode(data, spec, device), batch_size=batch_size)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, preds, truth = 0.0, [], []
    for *batch, labels in loader:
        logits = model(*(t.to(device) for t in batch))
        total_loss += float(criterion(logits, labels.to(device)))
        preds.append(logits.argmax(-1).cpu())
        truth.append(labels)
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(truth).numpy()
    return EvalResult(
        examples=len(data),
        loss=total_loss / max(len(data), 1),
        accuracy=float((y_pred == y_true).mean()) if len(data) else 0.0,
        macro_f1=macro_f1(y_true, y_pred, len(spec.labels)),
    )
