"""Build the U-Net: MobileNetV2 encoder (transfer learning) + pix2pix upsample decoder.

Each decoder level upsamples (pix2pix block), joins the encoder's skip activation and, with
``decoder_convs`` > 0, refines the join with 3x3 convolutions before the next level. With
``full_res_filters`` > 0 a last level at full resolution joins a convolution of the input itself.

The network takes ``uint8``-valued RGB (as float) and scales it itself, so the exported model
owns its input normalisation. It returns per-pixel class logits, then the distance logit when
the model has the distance output (see ``output_logits``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import keras
from keras import layers

from training.config import TrainConfig

#: MobileNetV2 activations used as skip connections, from 1/2 to 1/16 resolution.
SKIP_LAYERS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu")
#: The 1/32-resolution bottleneck.
BOTTLENECK_LAYER = "block_16_project"
#: Offline ImageNet weights (see ../shared/README.md), used when Keras cannot download its own.
SHARED_IMAGENET_WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2_1.0_imagenet_notop.weights.h5"
)
#: Inputs must be a multiple of the encoder's total stride.
STRIDE = 32


def upsample(filters: int, size: int, apply_dropout: float = 0.0, name: str | None = None) -> keras.Sequential:
    """pix2pix upsample block: Conv2DTranspose (stride 2) -> BatchNorm -> [Dropout] -> ReLU."""
    block = [
        layers.Conv2DTranspose(
            filters,
            size,
            strides=2,
            padding="same",
            kernel_initializer=keras.initializers.RandomNormal(0.0, 0.02),
            use_bias=False,
        ),
        layers.BatchNormalization(),
    ]
    if apply_dropout:
        block.append(layers.Dropout(apply_dropout))
    block.append(layers.ReLU())
    return keras.Sequential(block, name=name)


def conv_block(filters: int, name: str | None = None, batch_norm: bool = True) -> keras.Sequential:
    """3x3 Conv -> BatchNorm -> ReLU: mixes the upsampled features with the skip they were joined to.

    ``batch_norm`` False gives the conv a bias instead (see ``full_resolution_level`` for why).
    """
    norm = [layers.BatchNormalization()] if batch_norm else []
    return keras.Sequential([layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm),
                             *norm, layers.ReLU()], name=name)


def build_encoder(config: TrainConfig, input_shape: tuple[int | None, int | None, int]) -> keras.Model:
    """MobileNetV2 down stack returning the skip activations and the bottleneck."""
    weights = config.encoder_weights
    keras_weights = "imagenet" if weights == "imagenet" and not SHARED_IMAGENET_WEIGHTS.is_file() else None
    base = keras.applications.MobileNetV2(input_shape=input_shape, include_top=False, weights=keras_weights)
    if weights == "imagenet" and keras_weights is None:
        base.load_weights(SHARED_IMAGENET_WEIGHTS)  # before wrapping: Keras 3 matches by layer order
    elif weights not in ("imagenet", "none"):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights file not found: {path}")
        base.load_weights(path)
    outputs = [base.get_layer(name).output for name in (*SKIP_LAYERS, BOTTLENECK_LAYER)]
    encoder = keras.Model(inputs=base.input, outputs=outputs, name="mobilenetv2_encoder")
    encoder.trainable = config.fine_tune
    if config.fine_tune and config.fine_tune_from:
        first = fine_tune_start([layer.name for layer in base.layers], config.fine_tune_from)
        for layer in base.layers[:first]:
            layer.trainable = False  # backprop stops here: the costly full-resolution layers stay fixed
    if config.freeze_encoder_bn:
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False  # Keras 3: a non-trainable BatchNorm always runs in inference mode
    return encoder


def encoder_layer_names() -> list[str]:
    """Names of the MobileNetV2 encoder's layers (no weights loaded): what ``fine_tune_from`` may name."""
    base = keras.applications.MobileNetV2(input_shape=(None, None, 3), include_top=False, weights=None)
    return [layer.name for layer in base.layers]


def fine_tune_start(names: list[str], layer: str) -> int:
    """Index of the first fine-tuned layer; a clear error for a name the encoder does not have."""
    if layer not in names:
        raise ValueError(f"fine_tune_from: no encoder layer named {layer!r} (e.g. block_3_expand, block_6_expand)")
    return names.index(layer)


def build_unet(config: TrainConfig, fixed_size: bool | None = None) -> keras.Model:
    """The U-Net for ``config``: fixed ``image_size`` input in resize mode, any size in tile mode.

    Keras 3 passes the outer ``training`` flag down to nested models (a ``training=False`` given
    when the graph is built does not hold), so the encoder's trainable BatchNorm layers use batch
    statistics in training unless ``freeze_encoder_bn`` makes them non-trainable.
    """
    fixed = config.inference == "resize" if fixed_size is None else fixed_size
    side = config.image_size if fixed else None
    input_shape = (side, side, 3)
    inputs = keras.Input(shape=input_shape, name="image")
    if config.input_scale == "unit":
        x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    else:
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    encoder = build_encoder(config, input_shape)
    scaled = x
    *skips, x = encoder(x)
    for i, (filters, skip) in enumerate(zip(config.decoder_filters, reversed(skips))):
        x = upsample(filters, 3, config.dropout, name=f"up_{i}")(x)
        x = layers.Concatenate(name=f"skip_{i}")([x, skip])
        for j in range(config.decoder_convs):
            x = conv_block(filters, name=f"refine_{i}_{j}")(x)
    if config.full_res_filters:
        x = full_resolution_level(config.full_res_filters, x, scaled)
    return keras.Model(inputs=inputs, outputs=output_logits(config, x), name="unet_mobilenetv2")


def full_resolution_level(filters: int, features: keras.KerasTensor, scaled: keras.KerasTensor) -> keras.KerasTensor:
    """Upsample the 1/2-resolution features and join them to a 3x3 conv of the input itself.

    MobileNetV2's first layer already has stride 2, so without this level no full-resolution
    evidence reaches the logits: the thin dark gap between two touching nuclei is seen only at
    half resolution. No BatchNorm here: statistics of features this close to the pixels swing
    with each batch of 8 jittered crops (bright, inverted, stained), and a first run with
    BatchNorm scored validation losses up to 3.5x its training loss (docs/training.md).
    """
    x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="relu", name="up_full")(features)
    stem = conv_block(filters, name="stem_full", batch_norm=False)(scaled)
    x = layers.Concatenate(name="skip_full")([x, stem])
    return conv_block(filters, name="refine_full", batch_norm=False)(x)


def output_logits(config: TrainConfig, features: keras.KerasTensor) -> keras.KerasTensor:
    """Full-resolution logits: the classes, then the distance output when the model has one, then the rays.

    With ``distance_head`` > 0 the distance gets a branch of its own (3x3 conv blocks, then its
    own final layer), so the regression does not compete with the class logits for one layer.
    Logits are float32 whatever the training precision: softmax and loss stay exact.
    """
    def final(channels: int, name: str) -> layers.Layer:
        if config.full_res_filters:  # the features are at full resolution already
            return layers.Conv2D(channels, 1, name=name, dtype="float32")
        return layers.Conv2DTranspose(channels, 3, strides=2, padding="same", name=name, dtype="float32")

    if not (config.distance_output and config.distance_head):
        return final(config.output_channels, "logits")(features)
    branch = features
    for j in range(config.distance_head):
        branch = conv_block(config.decoder_filters[-1], name=f"distance_{j}")(branch)
    classes = final(config.num_classes, "class_logits")(features)
    distance = final(1 + config.rays, "distance_logits")(branch)  # the rays share the distance's branch
    return layers.Concatenate(name="logits", dtype="float32")([classes, distance])


def float32_copy(model: keras.Model, config: TrainConfig, fixed_size: bool | None = None) -> keras.Model:
    """The same network computing in float32, with ``model``'s weights (for a mixed-precision model).

    Models trained in ``mixed_bfloat16`` compute in bfloat16, which CPUs without native bf16
    support emulate slowly; serving always gets this float32 twin (the weights are float32 anyway).
    """
    return float32_network(config, model.get_weights(), fixed_size)


def float32_network(config: TrainConfig, weights: list, fixed_size: bool | None = None) -> keras.Model:
    """The network of ``config``, computing in float32, holding ``weights`` (in ``model.weights`` order)."""
    with precision("float32"):
        network = build_unet(replace(config, encoder_weights="none"), fixed_size)
    network.set_weights(weights)
    return network


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether training here computes bfloat16 natively: a GPU of compute capability 8 or more, or a CPU with
    AVX512_BF16 or AMX. Elsewhere (AVX2-only x86, Apple silicon's TensorFlow) bf16 is emulated, far slower
    than float32; CPUs whose flags cannot be read count as without."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        if tuple(capability) >= (8, 0):
            return True
    try:
        flags = set(" ".join(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolved_precision(policy: str, bf16: bool | None = None) -> str:
    """The Keras dtype policy ``policy`` means here: ``auto`` is mixed_bfloat16 where :func:`native_bf16`
    (or ``bf16``, when given), else float32; the others as they are."""
    if policy != "auto":
        return policy
    return "mixed_bfloat16" if (native_bf16() if bf16 is None else bf16) else "float32"


@contextmanager
def precision(policy: str) -> Iterator[None]:
    """Build layers under Keras dtype ``policy`` (e.g. ``config.precision``); the global policy is restored after.

    Layers take the policy when they are created, so only the model built inside the block is affected.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
