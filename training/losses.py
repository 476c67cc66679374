"""The loss and accuracy the network is fitted with (the ``fit`` step's objective).

Class logits are scored with softmax cross-entropy. A model with the distance output (see
``training.targets.distance_target``) returns one more logit per pixel, scored with sigmoid
cross-entropy against the normalised distance and added, ``distance_weight`` times, to the
class loss. With rays (StarDist), the mean absolute error of the ray distances, weighted by the
normalised distance target as StarDist weights it by its object probability (0 outside nuclei,
most at their centres, whose rays matter for the proposals), is added ``ray_weight`` times.
Per-pixel weights (boundaries, contacts) scale every term.
With ``dice_weight`` > 0, one minus the mean soft Dice of the nucleus classes (interior and boundary),
per image, is added that many times to every pixel of the image: cross-entropy scores each pixel alone,
so a nucleus of a few pixels, or the thin rim between two touching ones, counts for little in it, while
Dice scores each class' overlap as a whole, whatever its size.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from training.config import TrainConfig


def soft_dice_loss(classes: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """One minus the soft Dice of each nucleus class (all but background), averaged over them, per image: ``(B,)``.

    ``classes (B, H, W)``: class indices; ``logits (B, H, W, C)``. Smoothed by 1 so that a crop without
    nuclei, predicted empty, scores 0 rather than 0 / 0.
    """
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32))[..., 1:]
    truth = tf.one_hot(tf.cast(classes, tf.int32), tf.shape(logits)[-1])[..., 1:]
    overlap = tf.reduce_sum(probabilities * truth, axis=(1, 2))
    total = tf.reduce_sum(probabilities + truth, axis=(1, 2))
    return 1.0 - tf.reduce_mean((2.0 * overlap + 1.0) / (total + 1.0), axis=-1)


def segmentation_loss(config: TrainConfig) -> keras.losses.Loss | Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Cross-entropy over the classes, plus the weighted Dice and distance terms when the config asks for them."""
    if not config.distance_output and not config.dice_weight:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    classes, weight = config.num_classes, config.distance_weight

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        """``y_true``: class index ``(B, H, W)``, or ``(B, H, W, 2 [+ rays])`` with the normalised distance
        [and rays] after it; ``y_pred``: logits."""
        labels = tf.cast(y_true[..., 0] if config.distance_output else y_true, tf.int32)
        total = keras.losses.sparse_categorical_crossentropy(labels, y_pred[..., :classes], from_logits=True)
        if config.dice_weight:
            total += config.dice_weight * soft_dice_loss(labels, y_pred[..., :classes])[:, None, None]
        if not config.distance_output:
            return total
        total += weight * tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true[..., 1], logits=y_pred[..., classes])
        if config.rays:
            ray_error = tf.reduce_mean(tf.abs(y_true[..., 2:] - y_pred[..., classes + 1:]), axis=-1)
            total += config.ray_weight * y_true[..., 1] * ray_error
        return total

    return loss


def pixel_accuracy(config: TrainConfig) -> str | Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Per-pixel class accuracy, reported as ``accuracy`` whether or not the model has the distance output."""
    if not config.distance_output:
        return "accuracy"
    classes = config.num_classes

    def accuracy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return keras.metrics.sparse_categorical_accuracy(y_true[..., 0], y_pred[..., :classes])

    return accuracy
