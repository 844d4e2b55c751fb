"""Losses on an age head's logits: label-distribution learning (``train.loss: ldl``;
Gao et al. 2017, "Deep Label Distribution Learning with Label Ambiguity", with the
expectation's L1 term of their 2018 follow-up) and ordinal regression (``train.loss:
coral``; Cao et al. 2020, "Rank consistent ordinal regression for neural networks").

A model with ``model.age_distribution`` predicts probabilities over 1-month age bins
and returns their expected age. Trained with the MAE, only that expectation is
supervised; here the whole distribution is: each true age becomes a Gaussian of
``train.ldl_sigma`` months over the same bins (a reading is uncertain by months, and
neighbouring ages look alike), and the loss is the KL divergence from it plus
``train.ldl_l1_weight`` times the expected age's absolute error in years.

A model with ``model.ordinal`` scores each image once against a learned threshold
between each two 1-month bins; ``coral`` supervises every threshold with the binary
cross-entropy of "older than it", summed over the thresholds.

:class:`LabelDistributionTrainer` and :class:`OrdinalTrainer` are the models ``fit``
trains: the age model's own layers and weights, with its logits as a second output
for the loss. The saved model is the age model (one output, months): inference,
export and serving see no difference.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

MONTHS_PER_YEAR = 12.0


def gaussian_targets(ages: Any, low: int, high: int, sigma: float) -> Any:
    """Log-probabilities (batch, bins) of a Gaussian of ``sigma`` months around each
    age over the 1-month bins ``low``..``high``, normalised over those bins."""
    centers = ops.arange(low, high + 1, dtype="float32")[None, :]
    ages = ops.reshape(ops.cast(ages, "float32"), (-1, 1))
    return ops.log_softmax(-ops.square(centers - ages) / (2.0 * sigma * sigma), axis=-1)


def label_distribution_loss(ages: Any, logits: Any, months: Any, low: int, high: int,
                            sigma: float, l1_weight: float) -> Any:
    """Per-image loss (batch,): KL(target || softmax(logits)) + l1_weight * |expected
    age - age| / 12."""
    log_target = gaussian_targets(ages, low, high, sigma)
    log_p = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    kl = ops.sum(ops.exp(log_target) * (log_target - log_p), axis=-1)
    error = ops.reshape(ops.cast(months, "float32"), (-1,)) - ops.reshape(
        ops.cast(ages, "float32"), (-1,))
    return kl + l1_weight * ops.abs(error) / MONTHS_PER_YEAR


def coral_loss(ages: Any, logits: Any, low: int) -> Any:
    """Per-image loss (batch,): the binary cross-entropy of each threshold's logit
    (``low + 0.5``, ``low + 1.5``, ... months) against whether the age is above it,
    summed over the thresholds."""
    logits = ops.cast(logits, "float32")
    thresholds = low + 0.5 + ops.arange(ops.shape(logits)[-1], dtype="float32")[None, :]
    older = ops.cast(ops.reshape(ops.cast(ages, "float32"), (-1, 1)) > thresholds,
                     "float32")
    # -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))] = softplus(l) - y l
    return ops.sum(ops.softplus(logits) - older * logits, axis=-1)


class _HeadLossTrainer(keras.Model):
    """The age model with its logits (the ``head_out`` layer) as a second output;
    ``compute_loss`` is the subclass's per-image ``head_loss`` (sample weights as Keras'
    losses use them: the weighted mean over the batch), and the compiled metrics see
    the months only.

    Its weights are the age model's, in the same order, so ``age_model.set_weights(
    trainer.get_weights())`` copies a trained state back. The bins are the age model's
    own (its ``boneage`` layer's ``low`` and ``high``).
    """

    def __init__(self, age_model: keras.Model, **kwargs: Any) -> None:
        logits = age_model.get_layer("head_out").output
        super().__init__(age_model.inputs, [age_model.outputs[0], logits],
                         name=age_model.name, **kwargs)
        ages = age_model.get_layer("boneage")
        self.low, self.high = ages.low, ages.high

    def head_loss(self, ages: Any, logits: Any, months: Any) -> Any:
        raise NotImplementedError

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        months, logits = y_pred
        per_image = self.head_loss(y, logits, months)
        if sample_weight is not None:
            per_image = per_image * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        loss = ops.mean(per_image)
        if self.losses:
            loss = loss + ops.sum(self.losses)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y, y_pred[0], sample_weight)


class LabelDistributionTrainer(_HeadLossTrainer):
    """``train.loss: ldl``: the label-distribution loss on an ``AgeExpectation`` head."""

    def __init__(self, age_model: keras.Model, sigma: float, l1_weight: float,
                 **kwargs: Any) -> None:
        super().__init__(age_model, **kwargs)
        self.sigma, self.l1_weight = float(sigma), float(l1_weight)

    def head_loss(self, ages: Any, logits: Any, months: Any) -> Any:
        return label_distribution_loss(ages, logits, months, self.low, self.high,
                                       self.sigma, self.l1_weight)


class OrdinalTrainer(_HeadLossTrainer):
    """``train.loss: coral``: the thresholds' summed cross-entropy on an ``OrdinalAge``
    head."""

    def head_loss(self, ages: Any, logits: Any, months: Any) -> Any:
        return coral_loss(ages, logits, self.low)
