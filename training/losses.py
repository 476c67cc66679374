"""The loss and accuracy the network is fitted with (the ``fit`` step's objective).

Class logits are scored with softmax cross-entropy. A model with the distance output (see
``training.targets.distance_target``) returns one more logit per pixel, scored with sigmoid
cross-entropy against the normalised distance and added, ``distance_weight`` times, to the
class loss. With rays (StarDist), the mean absolute error of the ray distances, weighted by the
normalised distance target as StarDist weights it by its object probability (0 outside nuclei,
most at their centres, whose rays matter for the proposals), is added ``ray_weight`` times.
Per-pixel weights (boundaries, contacts) scale every term.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from training.config import TrainConfig


def segmentation_loss(config: TrainConfig) -> keras.losses.Loss | Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Cross-entropy over the classes, plus the weighted distance term when the model has it."""
    if not config.distance_output:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    classes, weight = config.num_classes, config.distance_weight

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        """``y_true (B, H, W, 2 [+ rays])``: class index, normalised distance [, rays]; ``y_pred``: logits."""
        class_loss = keras.losses.sparse_categorical_crossentropy(
            tf.cast(y_true[..., 0], tf.int32), y_pred[..., :classes], from_logits=True)
        distance_loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true[..., 1], logits=y_pred[..., classes])
        total = class_loss + weight * distance_loss
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
