"""Training configuration: one typed object, with named presets.

``reference`` reproduces the original notebook (binary mask, 128x128 resize, frozen encoder,
20 epochs); ``best`` is the shipped model's recipe (3 classes for touching nuclei, crops at a
canonical nucleus size, fine-tuned encoder, stain/intensity augmentation, native-resolution
tiled inference). Every field can be overridden from the command line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model (stored verbatim in ``metadata.json``)."""

    # data / split
    val_fraction: float = 0.2
    seed: int = 42
    train_fraction: float = 1.0  # <1: train on this seeded, modality-stratified share of the training split only
    #   (a data-scaling diagnostic: what more images could buy); the validation split is unchanged
    # what the network sees
    image_size: int = 128  # resize target (resize mode) or crop size (tile mode)
    inference: Literal["resize", "tile"] = "resize"
    normalise: Literal["none", "percentile"] = "none"
    input_scale: Literal["unit", "symmetric"] = "unit"  # x/255 or x/127.5 - 1 inside the model
    target: Literal["mask", "boundary"] = "mask"  # 2 classes, or background/interior/boundary
    boundary_width: int = 2
    # the preset's 2 px: 3 scored 0.606 / AP@0.5 0.818 and 1 0.604 / 0.811 vs 0.607 / 0.817 (docs/training.md)
    core_pixels: int = 0  # >0: every nucleus keeps at least this many interior pixels in the target (its deepest),
    #   where the rims would swallow it whole (training.targets.keep_cores); 0: rims as they fall
    #   9 scored 0.612 / AP@0.5 0.819 vs 0.614 / 0.823, and the tiny nuclei stayed missed (docs/training.md),
    #   so the preset keeps 0
    canonical_diameter: float | None = None  # rescale every image so nuclei have this diameter (px)
    # the preset's 20 px: 24 scored 0.596 / AP@0.5 0.806 and 16 0.590 / 0.806 vs 0.607 / 0.817 (docs/training.md)
    # model
    encoder_weights: str = "imagenet"  # "imagenet", "none", or a path to a .weights.h5 file
    fine_tune: bool = False
    fine_tune_from: str | None = None  # first encoder layer to train (earlier, high-resolution ones stay frozen)
    freeze_encoder_bn: bool = False  # keep the fine-tuned encoder's BatchNorm layers fixed, in inference mode;
    #   False: they normalise each training batch by its own statistics and update their running averages
    decoder_filters: tuple[int, ...] = (512, 256, 128, 64)
    decoder_convs: int = 0  # 3x3 conv-BN-ReLU blocks after each skip concatenation (0: pix2pix decoder)
    #   the preset's 2: two fits scored 0.614 / AP@0.5 0.823 and 0.613 / 0.823, vs 0.607 / 0.817 with 1
    #   (docs/training.md)
    full_res_filters: int = 0  # >0: a full-resolution decoder level joined to a conv of the input itself;
    #   0: the last transposed conv upsamples 1/2-resolution features straight to logits.
    #   Measured 0.592 / AP@0.5 0.803 with 8 (docs/training.md), so the preset keeps 0.
    dropout: float = 0.0
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    steps_per_epoch: int | None = None  # None: one pass over the training split
    # the preset's 8 x 200: 4 x 400 (the same crops, twice the updates) scored 0.604 / AP@0.5 0.809 vs 0.607 / 0.817
    # (docs/training.md)
    learning_rate: float = 1e-3
    # the preset's 1e-3: 3e-4 scored 0.605 / AP@0.5 0.815 and 2e-3 0.604 / 0.817 vs 0.607 / 0.817 (docs/training.md)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decay to 5% over the whole run
    ema_momentum: float = 0.0  # >0: the exported weights are an exponential moving average of the trained ones
    #   (Polyak averaging, Keras' use_ema), momentum per step; 0: the last step's weights
    #   0.999 with 27 epochs on DSB2018 + MoNuSeg scored 0.602 / MoNuSeg val AJI 0.544 vs 0.605 / 0.551
    #   (docs/generalisation.md "A third fit"), so the preset keeps 0
    boundary_weight: float = 1.0  # loss weight of boundary pixels (3-class target)
    contact_weight: float = 1.0  # weight factor where two nuclei touch (their rims and the gap between);
    # 5.0 scored 0.582 vs 0.592 at 1.0 (previous pix2pix-decoder recipe, docs/training.md), so the preset keeps 1.0
    small_weight: float = 1.0  # weight factor on the pixels of nuclei under half their image's median area;
    # 3.0 (30 epochs) scored 0.605 / AP@0.5 0.812 vs 0.608 / 0.817 (block_3_expand recipe, docs/training.md),
    # so the preset keeps 1.0
    dice_weight: float = 0.0  # >0: add this many times one minus the soft Dice of the nucleus classes, per image
    #   (training.losses), which scores small nuclei and the rims between touching ones as wholes
    #   1.0 scored 0.599 / AP@0.5 0.812 vs 0.607 / 0.817 (docs/training.md), so the preset keeps 0
    distance_weight: float = 0.0  # >0: a 4th output, each nucleus' normalised distance to its edge
    # (sigmoid, loss weighted this much); seeds are cut from it instead of from P(interior).
    # 1.0 on the then-shipped block_3_expand recipe (29 epochs) scored 0.597 / AP@0.5 0.814 vs 0.608 / 0.817,
    # so the preset keeps 0
    distance_head: int = 0  # 3x3 conv blocks in a branch of its own for the distance output (0: it shares
    # the class logits' final layer); 1 (with weight 1, 30 epochs) scored 0.602 / AP@0.5 0.816, so the preset keeps 0
    rays: int = 0  # >0 (needs the distance output): StarDist's star-convex shape, each nucleus pixel's distance
    # to its nucleus' edge along this many equally spaced rays (linear outputs after the distance output)
    # 32 (with distance weight 1 and head 1, 20 epochs) scored 0.598 / AP@0.5 0.813 decoded by the watershed and
    # 0.402 / 0.762 by polygon NMS (docs/training.md), so the preset keeps 0
    ray_weight: float = 0.2  # loss weight of the rays' mean absolute error (px), weighted by the distance target
    precision: Literal["auto", "float32", "mixed_bfloat16"] = "float32"  # training only; the export is float32.
    #   auto: mixed_bfloat16 where the hardware computes bf16 natively (AVX512_BF16 / AMX CPUs, GPUs of compute
    #   capability 8+), else float32: without it a bf16 step is emulated, 7.7x the float32 step on an AVX2 CPU
    #   (docs/training.md, "Precision on CPUs without bf16"); the fit records what it ran
    # augmentation
    rotation: float = 0.1  # fraction of a full turn, as keras.layers.RandomRotation
    zoom: float = 0.1  # relative zoom range (log-uniform between 1/(1+z) and 1+z for z>0)
    # the preset's 0.5: 0.25 (the sizes the service accepts without a rescaled pass) scored 0.604 / AP@0.5 0.813
    # vs 0.607 / 0.817 (docs/training.md)
    flip: bool = True
    colour: bool = False  # intensity / inversion / grayscale / hue jitter
    stain: bool = False  # also H&E (HED optical density) stain jitter, half the time (needs colour)
    artefacts: bool = False  # also defocus blur, strong noise and JPEG compression, each a third of the time
    #   on the preset: AP@0.5 on blurred / noisy / JPEG validation copies 0.795 / 0.803 / 0.793 vs 0.771 / 0.764 /
    #   0.777, but 0.602 / 0.819 vs 0.614 / 0.823 on the images as stored (docs/training.md), so the preset keeps False
    copy_paste: float = 0.0  # tile mode: chance that a training crop gets 1-10 of its own whole nuclei (or touching
    #   groups) pasted onto its free background (training.augment.paste_nuclei): more nuclei per crop
    #   0.5 on the preset: 0.613 / AP@0.5 0.824 vs 0.614 / 0.829, a tie (docs/training.md "Copy-paste"), so it has 0
    balance_modalities: bool = False  # oversample the rare bright-field and H&E images
    balance_power: float = 0.5  # with balance: a modality of n images gets a share of the crops ~ n ** (1 - power)
    # 1.0 (equal shares) scored 0.603 / AP@0.5 0.811 vs 0.608 / 0.817 (block_3_expand recipe), lower on every
    # modality (docs/training.md)
    # post-processing defaults (thresholds are re-tuned on validation and stored in metadata)
    min_size: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction <= 1.0:  # 0 would train on nothing; above 1 has no meaning
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.canonical_diameter is not None and self.canonical_diameter <= 0:  # from the CLI or a metadata file
            raise ValueError(f"canonical_diameter must be positive, got {self.canonical_diameter}")
        if self.boundary_width < 1:  # a rim of 0 px would leave touching interiors with nothing between them
            raise ValueError(f"boundary_width must be at least 1, got {self.boundary_width}")
        if self.zoom < 0:  # a negative range would make log1p(zoom) undefined or invert the interval
            raise ValueError(f"zoom must be non-negative, got {self.zoom}")
        if self.small_weight <= 0:  # zero would silently drop small nuclei from the loss
            raise ValueError(f"small_weight must be positive, got {self.small_weight}")
        if self.artefacts and not self.colour:  # they are part of the photometric augmentation
            raise ValueError("artefacts need the colour augmentation (colour=True)")
        if not 0.0 <= self.copy_paste <= 1.0:  # a probability
            raise ValueError(f"copy_paste must be in [0, 1], got {self.copy_paste}")
        if self.copy_paste and (self.inference != "tile" or self.rays):  # crops only; pasted labels would repeat ids
            raise ValueError("copy_paste needs tile mode (inference='tile') and no rays")
        if not 0.0 <= self.ema_momentum < 1.0:  # 1 would never move off the initial weights
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.dice_weight < 0:  # a negative weight would reward the network for missing nuclei
            raise ValueError(f"dice_weight must be 0 or more, got {self.dice_weight}")
        # the counts that the CLI's non_negative type guards: -1 would silently build no layer (range(-1) is
        # empty) or, for rays, take a channel away from the output while still counting as "has rays"
        for name in ("decoder_convs", "full_res_filters", "distance_head", "rays", "core_pixels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.core_pixels and self.target != "boundary":  # the 2-class mask has no interior to keep
            raise ValueError("core_pixels needs the 3-class boundary target")
        if self.rays and not self.distance_output:
            raise ValueError("rays need the distance output (distance_weight > 0): it is their object probability")
        if self.rays and self.target != "boundary":  # the service reads rays from channel 4 (service.postprocess)
            raise ValueError("rays need the 3-class boundary target: the service reads them after 3 classes and the "
                             "distance output")

    @property
    def num_classes(self) -> int:
        return 2 if self.target == "mask" else 3

    @property
    def distance_output(self) -> bool:
        """Whether the network has the distance output (a positive loss weight trains it)."""
        return self.distance_weight > 0

    @property
    def output_channels(self) -> int:
        """Class logits, plus one distance logit when the distance output is trained, plus the rays."""
        return self.num_classes + (1 if self.distance_output else 0) + self.rays

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["decoder_filters"] = list(self.decoder_filters)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        clean = {k: v for k, v in data.items() if k in names}
        if "decoder_filters" in clean:
            clean["decoder_filters"] = tuple(clean["decoder_filters"])
        return cls(**clean)

    def override(self, **changes: Any) -> "TrainConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS: dict[str, TrainConfig] = {
    "reference": TrainConfig(),
    "best": TrainConfig(
        image_size=256,
        inference="tile",
        normalise="percentile",
        input_scale="symmetric",
        target="boundary",
        canonical_diameter=20.0,
        fine_tune=True,
        fine_tune_from=None,  # the whole encoder: 0.608 / AP@0.5 0.817 from block_3_expand (30 epochs, BatchNorm
        freeze_encoder_bn=True,  # following each batch) vs 0.609 / 0.819 here in 23 (docs/training.md)
        decoder_filters=(256, 128, 64, 32),  # one refine conv per level: 0.608 vs 0.592 for (512, 256, 128, 64)
        decoder_convs=2,  # without; two: 0.614 and 0.613 vs 0.607 with one, at 1.28x the time per 1 MP image
        dropout=0.0,
        epochs=23,  # 4,600 steps, 73.6 min: 0.96 s/step in the real fit (input pipeline included)
        batch_size=8,
        steps_per_epoch=200,
        learning_rate=1e-3,
        lr_schedule="cosine",
        boundary_weight=2.0,
        rotation=0.5,
        zoom=0.5,
        colour=True,
        stain=True,
        balance_modalities=True,
        precision="auto",  # mixed_bfloat16 on CPUs with AVX512_BF16 (73-79 % of the float32 step), else float32
    ),
}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None

