"""Mixed-sample regression: C-Mixup (Yao et al. 2022, "C-Mixup: Improving
Generalization in Regression") within each training batch.

Each image is blended with a partner from its batch, ``lam * a + (1 - lam) * b``, and so
are the bone ages and the loss weights, with ``lam ~ Beta(alpha, alpha)`` drawn per
image (``augment.mixup_alpha``; 0 is off). The partner is drawn with probability
``exp(-(age_a - age_b)**2 / (2 * sigma**2))`` (``augment.mixup_sigma`` months; null:
every partner equally likely, plain mixup), so images are mixed mostly with images of
a similar age and the blended label stays close to what the blended image shows. Only
images of the same sex are partners (the sex input is not blended), and an image of
weight 0 (padding, or one that failed to decode) neither mixes nor is mixed in; an
image without any partner is left as it is.

Two implementations of the same draw: NumPy for the PyDataset loader, TensorFlow ops
for tf.data. Validation and evaluation never mix.

    >>> images, labels, weights = mix_numpy(images, male, labels, weights, alpha=0.4,
    ...                                     sigma=12.0, rng=np.random.default_rng(0))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import tensorflow_for_input

NO_PARTNER = -1e9   # the logit of a forbidden partner
SELF = -1e8         # of the image itself: chosen only where no partner is allowed


def partner_logits(labels: np.ndarray, male: np.ndarray | None, weights: np.ndarray,
                   sigma: float | None) -> np.ndarray:
    """(batch, batch) log-probabilities (unnormalised) of each row's partner."""
    labels = np.asarray(labels, np.float64).reshape(-1)
    n = len(labels)
    logits = (np.zeros((n, n)) if sigma is None else
              -np.square(labels[:, None] - labels[None, :]) / (2.0 * sigma ** 2))
    real = np.asarray(weights).reshape(-1) > 0
    allowed = real[:, None] & real[None, :]
    if male is not None:
        sex = np.asarray(male).reshape(-1)
        allowed &= sex[:, None] == sex[None, :]
    np.fill_diagonal(allowed, False)
    logits = np.where(allowed, logits, NO_PARTNER)
    np.fill_diagonal(logits, SELF)
    return logits


def mix_numpy(images: np.ndarray, male: np.ndarray | None, labels: np.ndarray,
              weights: np.ndarray, alpha: float, sigma: float | None,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's images, labels and weights blended with drawn partners."""
    labels = np.asarray(labels, np.float32)
    weights = np.asarray(weights, np.float32)
    logits = partner_logits(labels, male, weights, sigma)
    # Gumbel-max: one categorical draw per row
    partner = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
    lam = rng.beta(alpha, alpha, size=len(labels)).astype(np.float32)
    lam = np.where(partner == np.arange(len(labels)), 1.0, lam).astype(np.float32)
    blend = lam.reshape((-1,) + (1,) * (images.ndim - 1))
    images = blend * images + (1 - blend) * images[partner]
    return (images.astype(np.float32), lam * labels + (1 - lam) * labels[partner],
            lam * weights + (1 - lam) * weights[partner])


def mix_tf(images: Any, male: Any, labels: Any, weights: Any, alpha: float,
           sigma: float | None, seed: Any) -> tuple[Any, Any, Any]:
    """:func:`mix_numpy` in TensorFlow ops for a tf.data map; ``seed`` a shape-(2,)
    integer tensor (stateless draws)."""
    tf = tensorflow_for_input()
    labels = tf.cast(tf.reshape(labels, [-1]), tf.float32)
    n = tf.shape(labels)[0]
    if sigma is None:
        logits = tf.zeros([n, n])
    else:
        logits = -tf.square(labels[:, None] - labels[None, :]) / (2.0 * sigma ** 2)
    real = tf.reshape(weights, [-1]) > 0
    allowed = real[:, None] & real[None, :]
    if male is not None:
        sex = tf.reshape(male, [-1])
        allowed = allowed & tf.equal(sex[:, None], sex[None, :])
    eye = tf.eye(n, dtype=tf.bool)
    allowed = allowed & ~eye
    logits = tf.where(allowed, logits, NO_PARTNER)
    logits = tf.where(eye, SELF, logits)
    seeds = [tf.random.experimental.stateless_fold_in(seed, k) for k in range(3)]
    partner = tf.random.stateless_categorical(logits, 1, seeds[0])[:, 0]
    g1 = tf.random.stateless_gamma([n], seeds[1], alpha=alpha)
    g2 = tf.random.stateless_gamma([n], seeds[2], alpha=alpha)
    lam = tf.math.divide_no_nan(g1, g1 + g2)
    lam = tf.where(tf.equal(partner, tf.range(n, dtype=partner.dtype)), 1.0, lam)
    blend = tf.reshape(lam, [-1, 1, 1, 1])
    images = blend * images + (1 - blend) * tf.gather(images, partner)
    return (images, lam * labels + (1 - lam) * tf.gather(labels, partner),
            lam * weights + (1 - lam) * tf.gather(weights, partner))
