"""Label-distribution learning (``train.loss: ldl``; Gao et al. 2017, "Deep Label
Distribution Learning with Label Ambiguity", with the expectation's L1 term of their
2018 follow-up).

A model with ``model.age_distribution`` predicts probabilities over 1-month age bins
and returns their expected age. Trained with the MAE, only that expectation is
supervised; here the whole distribution is: each true age becomes a Gaussian of
``train.ldl_sigma`` months over the same bins (a reading is uncertain by months, and
neighbouring ages look alike), and the loss is the KL divergence from it plus
``train.ldl_l1_weight`` times the expected age's absolute error in years.

:class:`LabelDistributionTrainer` is the model ``fit`` trains: the age model's own
layers and weights, with its logits as a second output for the loss. The saved model
is the age model (one output, months): inference, export and serving see no
difference.
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


class LabelDistributionTrainer(keras.Model):
    """The age model with its logits as a second output; ``compute_loss`` is the
    label-distribution loss (sample weights as Keras' losses use them: the weighted
    mean over the batch), and the compiled metrics see the months only.

    Its weights are the age model's, in the same order, so ``age_model.set_weights(
    trainer.get_weights())`` copies a trained state back. The bins are the age model's
    own (its ``AgeExpectation`` layer, named ``boneage``).
    """

    def __init__(self, age_model: keras.Model, sigma: float, l1_weight: float,
                 **kwargs: Any) -> None:
        logits = age_model.get_layer("head_out").output
        super().__init__(age_model.inputs, [age_model.outputs[0], logits],
                         name=age_model.name, **kwargs)
        expectation = age_model.get_layer("boneage")
        self.low, self.high = expectation.low, expectation.high
        self.sigma, self.l1_weight = float(sigma), float(l1_weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        months, logits = y_pred
        per_image = label_distribution_loss(y, logits, months, self.low, self.high,
                                            self.sigma, self.l1_weight)
        if sample_weight is not None:
            per_image = per_image * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        loss = ops.mean(per_image)
        if self.losses:
            loss = loss + ops.sum(self.losses)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y, y_pred[0], sample_weight)
