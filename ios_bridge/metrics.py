"""Classification loss and accuracy from predicted probabilities, computed one way for everyone."""

from __future__ import annotations

import numpy as np

# Probabilities are clipped before the log, as Keras and Core ML do, so one confident mistake
# gives a large but finite loss.
PROBABILITY_FLOOR = 1e-7


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of N x K class probabilities against N integer labels."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    probs = np.asarray(probabilities, dtype=np.float64).reshape(len(labels), -1)
    if len(labels) == 0:
        return 0.0, 0.0
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {probs.shape[1] - 1}] for {probs.shape[1]} classes, "
            f"got values from {labels.min()} to {labels.max()}"
        )
    picked = np.clip(probs[np.arange(len(labels)), labels], PROBABILITY_FLOOR, 1.0)
    return float(-np.log(picked).mean()), float((probs.argmax(axis=1) == labels).mean())
