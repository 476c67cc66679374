"""Seconds per training step of the U-Net for the choices behind the ``best`` preset.

    python -m benchmarks.train_step_speed

Batch of 8 random 256x256 crops, constant data (so the input pipeline is not measured), median
of 8 steps after 3 warm-up steps, for: whole encoder fine-tuned with its BatchNorm following
each batch, fine-tuned from ``block_3_expand`` in float32 and in mixed bfloat16 (the previous
preset), the whole encoder with its BatchNorm fixed (the preset), frozen encoder, the decoder
variants (the earlier wide pix2pix decoder, the thin one without refine convs), and XLA compilation.
Every row but the preset's names its encoder training, so the table does not change meaning
when the preset does.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from training.config import preset  # noqa: E402
from training.model import build_unet, precision, resolved_precision  # noqa: E402
from training.train import compile_model  # noqa: E402

#: The recipe shipped before the whole-encoder one; the earlier rows of docs/training.md were measured on it.
FROM_BLOCK_3 = dict(fine_tune_from="block_3_expand", freeze_encoder_bn=False)

VARIANTS = {
    "whole encoder fine-tuned, BatchNorm following each batch, float32": dict(
        fine_tune=True, fine_tune_from=None, freeze_encoder_bn=False, precision="float32"),
    "fine-tuned from block_3_expand, float32": dict(**FROM_BLOCK_3, precision="float32"),
    "fine-tuned from block_3_expand, mixed_bfloat16 (previous preset)": FROM_BLOCK_3,
    "whole encoder fine-tuned, BatchNorm fixed, mixed_bfloat16 (the preset where bf16 is native)": dict(
        precision="mixed_bfloat16"),
    "whole encoder fine-tuned, BatchNorm fixed, float32 (the preset elsewhere)": dict(precision="float32"),
    "frozen encoder": dict(fine_tune=False, precision="float32"),
    "pix2pix decoder (512, 256, 128, 64), no refine convs, from block_3_expand, mixed_bfloat16": dict(
        **FROM_BLOCK_3, decoder_filters=(512, 256, 128, 64), decoder_convs=0),
    "decoder (256, 128, 64, 32), no refine convs, from block_3_expand, mixed_bfloat16": dict(
        **FROM_BLOCK_3, decoder_convs=0),
}  # changes applied with dataclasses.replace (None is a real value here)


def step_seconds(config, jit: bool = False, steps: int = 8) -> float:
    with precision(resolved_precision(config.precision)):
        model = build_unet(config, fixed_size=None)
    compile_model(model, config)
    if jit:
        model.compile(optimizer=model.optimizer, loss=model.loss, jit_compile=True)
    rng = np.random.default_rng(0)
    x = rng.random((8, 256, 256, 3), dtype=np.float32) * 255
    y = rng.integers(0, 3, (8, 256, 256))
    model.fit(x, y, batch_size=8, epochs=1, steps_per_epoch=3, verbose=0)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    base = preset("best")
    print("| variant | s/step |\n|---|---|")
    for name, changes in VARIANTS.items():
        print(f"| {name} | {step_seconds(replace(base, **changes)):.2f} |", flush=True)
    print(f"| float32 preset with XLA (jit_compile=True) | {step_seconds(replace(base, precision='float32'), jit=True):.2f} |")
    tf.keras.backend.clear_session()


if __name__ == "__main__":
    main()
