"""Export a model folder as a bioimage.io model package (``rdf.yaml``, format 0.5).

``python -m training.export_bioimageio --model models/default --out DIR [--zip]`` writes DIR, a
package folder that bioimage.io tools read: ``rdf.yaml``, the SavedModel zipped as
``tensorflow_saved_model_bundle`` weights, a test input with the network's own output on it, a
cover image, a README (outputs, our decoding, nucleus size, licences, citations) and our
``metadata.json`` as an attachment. ``--zip`` also writes ``DIR.zip`` (the same package, one file).

What runs where, as the package states it:

* inside the SavedModel: ``uint8`` -> float, the scaling to the network's range (``x/255`` or
  ``x/127.5 - 1``), the network, softmax (``export.ServingModule``);
* outside it, before the network, described as the input's ``preprocessing``: the service's
  joint percentile stretch (``service.normalise``) as ``scale_range`` -> ``clip`` ->
  ``scale_linear`` -> ``ensure_dtype uint8``;
* outside it and not expressible in the format: rescaling the image so nuclei are the model's
  canonical diameter, and the decoding of probabilities into instances (``service.postprocess``);
  the README says how to do both.

The package is validated offline (``bioimageio.spec``, with its file checks) before it replaces DIR;
an invalid package fails the export. Nothing is fetched: the description holds no URL that the
validator would try, only DOIs.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.model import METADATA_FILE, SUPPORTED_FORMAT, ModelLoadError, SegmentationModel
from service.normalise import STRETCH_PERCENTILES
from service.postprocess import RAY_START, PostprocessParams
from service.tiling import GRID

#: Side of the default test image (a multiple of ``GRID``).
DEFAULT_SIZE = 256
#: Smallest tile side we declare: the service never runs tiles smaller than two grid cells.
MIN_SIDE = 2 * GRID
AUTHORS = "nuclei-seg contributors"
TAGS = ["nuclei", "segmentation", "semantic-segmentation", "2d", "fluorescence-light-microscopy", "brightfield",
        "transmission-light-microscopy", "histology", "tissue", "unet", "tensorflow"]
#: SavedModel files zipped as the weights (everything else in the model folder is ours).
SAVED_MODEL_PARTS = ("saved_model.pb", "fingerprint.pb", "variables", "assets")
TEST_INPUT, TEST_OUTPUT = "test_input.npy", "test_output.npy"
SAMPLE_INPUT, SAMPLE_OUTPUT = "sample_input.png", "sample_output.tif"
COVER, DOCUMENTATION, WEIGHTS = "cover.png", "README.md", "tf_saved_model_bundle.zip"


@dataclass(frozen=True)
class Citation:
    text: str
    doi: str


#: Papers to cite for a training source, by a folder name in the source's name or path (as ``training.data``).
DATASET_CITATIONS: dict[str, list[Citation]] = {
    "dsb2018": [Citation("Caicedo J. C. et al. Nucleus segmentation across imaging experiments: the 2018 Data "
                         "Science Bowl. Nature Methods 16, 1247-1253 (2019)", "10.1038/s41592-019-0612-7")],
    "monuseg": [
        Citation("Kumar N. et al. A Dataset and a Technique for Generalized Nuclear Segmentation for "
                 "Computational Pathology. IEEE Transactions on Medical Imaging 36(7), 1550-1560 (2017)",
                 "10.1109/TMI.2017.2677499"),
        Citation("Kumar N. et al. A Multi-Organ Nucleus Segmentation Challenge (MoNuSeg). IEEE Transactions "
                 "on Medical Imaging 39(5), 1380-1391 (2020, online 2019)", "10.1109/TMI.2019.2947628"),
    ],
}
ARCHITECTURE_CITATIONS = [
    Citation("Ronneberger O., Fischer P., Brox T. U-Net: Convolutional Networks for Biomedical Image "
             "Segmentation. MICCAI 2015, LNCS 9351, 234-241", "10.1007/978-3-319-24574-4_28"),
    Citation("Sandler M. et al. MobileNetV2: Inverted Residuals and Linear Bottlenecks. CVPR 2018, 4510-4520",
             "10.1109/CVPR.2018.00474"),
]
#: Licence words of metadata.json -> SPDX identifiers (what bioimage.io's ``license`` takes).
SPDX_LICENCES = {"CC BY-NC-SA 4.0": "CC-BY-NC-SA-4.0", "CC-BY-NC-SA-4.0": "CC-BY-NC-SA-4.0",
                 "CC BY-NC 4.0": "CC-BY-NC-4.0", "CC-BY-NC-4.0": "CC-BY-NC-4.0",
                 "CC BY-SA 4.0": "CC-BY-SA-4.0", "CC-BY-SA-4.0": "CC-BY-SA-4.0",
                 "CC BY 4.0": "CC-BY-4.0", "CC-BY-4.0": "CC-BY-4.0", "CC0-1.0": "CC0-1.0", "CC0": "CC0-1.0"}
#: Weights trained only on permissively licensed data take the project's own licence.
PROJECT_LICENCE = "MIT"


class ExportError(RuntimeError):
    """The package could not be built or did not validate (the message says why)."""


def spdx_licence(text: str | None) -> str | None:
    """The SPDX id a metadata licence string starts with (``"CC BY-NC-SA 4.0 (MoNuSeg ...)"``), else None."""
    if not text:
        return None
    for words, spdx in sorted(SPDX_LICENCES.items(), key=lambda item: -len(item[0])):
        if text.strip().upper().startswith(words.upper()):
            return spdx
    return None


def weights_licence(metadata: dict[str, Any]) -> str:
    """The licence the weights inherit from their training data (``data.sources`` in metadata.json).

    Data under a share-alike or non-commercial licence binds the weights to it (the shipped model:
    MoNuSeg's CC BY-NC-SA 4.0); data that is public domain or only asks for attribution leaves
    the weights under the project's licence. A source whose licence is not recorded or not
    recognised, or two different restrictive licences, cannot be decided here: pass ``--license``.
    """
    sources = data_sources(metadata)
    unknown = [f"{s.get('name')} ({s.get('licence') or 'not recorded'})" for s in sources
               if spdx_licence(s.get("licence")) is None]
    if unknown or not sources:
        raise ExportError("the licence of the training data is not known for "
                          + (", ".join(unknown) if unknown else "this model (metadata.json has no data.sources)")
                          + ": choose the weights' licence with --license SPDX-ID")
    restrictive = {spdx for spdx in (spdx_licence(s.get("licence")) for s in sources)
                   if spdx and ("-NC" in spdx or "-SA" in spdx or "-ND" in spdx)}
    if len(restrictive) > 1:
        raise ExportError(f"training data under several restrictive licences {sorted(restrictive)}: "
                          "choose the weights' licence with --license")
    return restrictive.pop() if restrictive else PROJECT_LICENCE


def data_sources(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    return list((metadata.get("data") or {}).get("sources") or [])


def citations(metadata: dict[str, Any]) -> list[Citation]:
    """The architecture's papers, then those of each training source we know (no duplicates)."""
    found = list(ARCHITECTURE_CITATIONS)
    for source in data_sources(metadata):
        where = f"{source.get('name', '')} {source.get('path', '')}".lower()  # as training.data knows them
        for key, papers in DATASET_CITATIONS.items():
            found += [c for c in papers if key in where and c not in found]
    return found


def channel_names(metadata: dict[str, Any], channels: int) -> list[str]:
    """Output channel names: the classes, then the distance output and StarDist rays where present."""
    names = [str(c) for c in metadata["classes"]]
    if channels > len(names):
        names.append("distance")
    names += [f"ray_{k:02d}" for k in range(channels - len(names))]
    return names[:channels]


# --- the test image -----------------------------------------------------------------------------

def synthetic_sample(size: int, diameter: float, seed: int = 0) -> np.ndarray:
    """A fluorescence-like ``(size, size, 3) uint8`` image: blurred nuclei of about ``diameter`` px,
    of varied brightness and shape, a few touching, on a dim noisy background (as
    tests/synthetic.py draws them, at the model's nucleus size)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    image = np.full((size, size), 18.0, np.float32)
    taken = np.zeros((size, size), bool)
    radius = diameter / 2.0
    wanted = int(0.35 * size * size / (np.pi * radius * radius))
    reach = int(np.ceil(radius * 1.25)) + 2
    rows, cols = np.mgrid[-reach:reach + 1, -reach:reach + 1].astype(np.float32)
    placed = 0
    for _ in range(wanted * 20):
        if placed == wanted:
            break
        r_major = radius * rng.uniform(0.8, 1.25)
        r_minor = r_major * rng.uniform(0.7, 1.0)
        angle = rng.uniform(0, np.pi)
        centre = rng.integers(reach, size - reach, 2)
        u = rows * np.cos(angle) + cols * np.sin(angle)
        v = -rows * np.sin(angle) + cols * np.cos(angle)
        nucleus = (u / r_major) ** 2 + (v / r_minor) ** 2 <= 1.0
        window = (slice(centre[0] - reach, centre[0] + reach + 1), slice(centre[1] - reach, centre[1] + reach + 1))
        if (nucleus & ndi.binary_dilation(taken[window])).sum() > 0.08 * nucleus.sum():
            continue  # at most a little contact: touching nuclei, never overlapping ones
        taken[window] |= nucleus
        image[window][nucleus] = rng.uniform(110, 230) + rng.normal(0, 12, int(nucleus.sum()))
        placed += 1
    image = ndi.gaussian_filter(image, 1.0) + rng.normal(0, 5, image.shape)
    gray = np.clip(image, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def read_sample(path: Path) -> np.ndarray:
    """An image file as the service decodes it: ``(H, W, 3) uint8`` RGB."""
    from service.decode import decode_image

    return decode_image(Path(path).read_bytes())


def crop_for_network(image: np.ndarray, side: int | None, fixed: int | None) -> np.ndarray:
    """The centre crop the network takes: ``fixed`` square, or sides that are multiples of ``GRID``
    (at most ``side``)."""
    height, width = image.shape[:2]
    if fixed is not None:
        if height < fixed or width < fixed:
            raise ExportError(f"the sample is {height}x{width} px; this network takes exactly {fixed}x{fixed}")
        want_h = want_w = fixed
    else:
        want_h, want_w = (height // GRID) * GRID, (width // GRID) * GRID
        if side is not None:
            want_h, want_w = min(want_h, side), min(want_w, side)
        if want_h < MIN_SIDE or want_w < MIN_SIDE:
            raise ExportError(f"the sample is {height}x{width} px; the test input needs at least "
                              f"{MIN_SIDE}x{MIN_SIDE}")
    top, left = (height - want_h) // 2, (width - want_w) // 2
    return np.ascontiguousarray(image[top:top + want_h, left:left + want_w])


# --- the files of the package -------------------------------------------------------------------

def zip_saved_model(model_dir: Path, out: Path) -> Path:
    """The SavedModel's own files (not our metadata or figures) in a zip, paths relative to its root."""
    if not (model_dir / "saved_model.pb").is_file():
        raise ExportError(f"no SavedModel in {model_dir} (saved_model.pb missing)")
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for part in SAVED_MODEL_PARTS:
            path = model_dir / part
            if path.is_file():
                archive.write(path, part)
            elif path.is_dir():
                archive.writestr(part + "/", b"")
                for child in sorted(p for p in path.rglob("*")):
                    name = child.relative_to(model_dir).as_posix()
                    if child.is_dir():
                        archive.writestr(name + "/", b"")
                    else:
                        archive.write(child, name)
    return out


def cover_png(image: np.ndarray, labels: np.ndarray, out: Path) -> Path:
    """2:1 cover (bioimage.io asks for 2:1 or 1:1, under 500 kB): the test image, then its nuclei
    outlined by ``service.encode.overlay_png``; upscaled (nearest) to at least 256 px high."""
    from PIL import Image

    from service.encode import overlay_png

    overlay = np.asarray(Image.open(io.BytesIO(overlay_png(image, labels))).convert("RGB"))
    side = max(image.shape[:2])
    square = []
    for panel in (image, overlay):
        canvas = np.zeros((side, side, 3), np.uint8)  # a non-square test image sits on a black square
        canvas[:panel.shape[0], :panel.shape[1]] = panel
        square.append(canvas)
    cover = Image.fromarray(np.concatenate(square, axis=1))
    if side < 256:
        factor = -(-256 // side)
        cover = cover.resize((cover.width * factor, cover.height * factor), Image.NEAREST)
    cover.save(out, optimize=True)
    if out.stat().st_size > 500_000:
        cover.thumbnail((1024, 512))
        cover.save(out, optimize=True)
    return out


def preprocessing_steps(mode: str) -> list[Any]:
    """``service.normalise`` as bioimage.io pre-processing (before the network, outside the SavedModel).

    ``percentile``: per image, the 1st and 99.8th percentiles of all pixels and channels together
    map to 0 and 255 (``scale_range`` over y, x and channel -> [0, 1], ``clip``, x255, and +0.5 so
    the cast to ``uint8`` rounds as the service does). ``none``: the image goes in as it is.
    """
    from bioimageio.spec.model import v0_5

    if mode == "none":
        return []
    if mode != "percentile":
        raise ExportError(f"normalisation {mode!r} has no bioimage.io description")
    low, high = STRETCH_PERCENTILES
    return [
        v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")),
        v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
            axes=[v0_5.AxisId("y"), v0_5.AxisId("x"), v0_5.AxisId("channel")],
            min_percentile=low, max_percentile=high)),
        v0_5.ClipDescr(kwargs=v0_5.ClipKwargs(min=0.0, max=1.0)),
        v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(gain=255.0, offset=0.5)),
        v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="uint8")),
    ]


def described_preprocessing(image: np.ndarray, mode: str) -> np.ndarray:
    """What the package's ``preprocessing`` makes of an ``(H, W, 3) uint8`` image, computed as
    bioimage.io's reference implementation (bioimageio.core) does: float32, ``(x - p_low) /
    (p_high - p_low + 1e-6)``, clipped to [0, 1], ``x 255 + 0.5``, truncated to ``uint8``.

    It equals ``service.normalise`` but for a grey level at exact rounding ties (the 1e-6 moves a
    tie down; the service's ``round`` takes it to even), and an image of almost one grey level,
    which the service leaves as it is: the test output is computed from this, so that a tool
    applying the described pre-processing reproduces it.
    """
    if mode == "none":
        return image
    if mode != "percentile":
        raise ExportError(f"normalisation {mode!r} has no bioimage.io description")
    values = image.astype(np.float32)
    low, high = np.percentile(values, STRETCH_PERCENTILES)
    scaled = np.clip((values - low) / (high - low + 1e-6), 0.0, 1.0) * 255.0 + 0.5
    return scaled.astype(np.uint8)


def documentation(metadata: dict[str, Any], *, channels: list[str], licence: str, cites: list[Citation],
                  fixed: int | None, halo: int, sample: str, has_report: bool) -> str:
    """The package's README.md: what goes in and out, what runs where, our decoding, data and licences."""
    infer = metadata.get("inference") or {}
    config = metadata.get("training_config") or {}
    diameter = infer.get("canonical_diameter")
    mode = infer.get("normalise", "none")
    scale = "x / 127.5 - 1" if config.get("input_scale") == "symmetric" else "x / 255"
    params = PostprocessParams.from_dict(metadata.get("postprocess"))
    by_modality = {name: PostprocessParams.from_dict(p) for name, p in
                   (metadata.get("postprocess_by_modality") or {}).items()}
    classes = [str(c) for c in metadata["classes"]]
    size_text = (f"exactly {fixed} x {fixed} px" if fixed else
                 f"height and width multiples of {GRID}, at least {MIN_SIDE} px (any larger size)")
    lines = [
        "# nuclei-seg: nucleus segmentation U-Net (MobileNetV2 encoder)",
        "",
        f"A U-Net with a MobileNetV2 encoder predicting, for every pixel of a 2D RGB image, the "
        f"probabilities of {len(classes)} classes: {', '.join(f'`{c}`' for c in classes)}. It was trained "
        "on fluorescence, bright-field and H&E histology images (see *Training data and licences*). It "
        "was exported from a nuclei-seg model folder by `python -m training.export_bioimageio`; "
        "`metadata.json` (attached) is that folder's own description, read by the nuclei-seg service.",
        "",
        "The outputs are **probabilities, not instances**: to get one label per nucleus, decode them "
        "as described in *From probabilities to nuclei* (the nuclei-seg service does it for you).",
        "",
        "## Input",
        "",
        f"- Tensor `images`: `uint8` RGB, axes batch, y, x, channel (NHWC), {size_text}. A gray image "
        "goes in as three equal channels; 16-bit or float images must be mapped to 8 bits first.",
        ("- **Nucleus size.** The network was trained with every image rescaled so its median nucleus "
         f"is **{diameter:g} px** across (zoom augmentation ×/÷{1 + float(config.get('zoom', 0)):g}). "
         f"Rescale your image so nuclei are about {diameter:g} px in diameter before running the "
         "model, and bring the output back to the image's size. This is not expressible in the "
         "bioimage.io format, so no tool does it for you; the nuclei-seg service does it (given "
         "a `diameter`, or estimated from the model's own output, `service/size.py`)." if diameter else
         "- **Nucleus size.** This model has no canonical nucleus size"
         + (f": nuclei-seg resizes the whole image to {fixed} x {fixed} px, runs the network once and "
            "resizes the probabilities back to the image's size." if fixed else
            ": nuclei-seg runs it on images at their own resolution.")),
        "- **What runs where.** Inside the SavedModel: the cast to float, the scaling to the network's "
        f"range ({scale}), the network and the softmax. Before it, outside the SavedModel and described "
        "here as the input's `preprocessing`: "
        + (f"the per-image intensity stretch of nuclei-seg (`service/normalise.py`): percentiles "
           f"{STRETCH_PERCENTILES[0]:g} and {STRETCH_PERCENTILES[1]:g} of all pixels and "
           "channels together become 0 and 255 (clipped, rounded to `uint8`; hue is kept because the "
           "channels share one stretch) — `scale_range` over y, x and channel, `clip` [0, 1], "
           "`scale_linear` ×255 +0.5, `ensure_dtype uint8`. Tools that apply the pre-processing give the "
           "network what it was trained on; calling the SavedModel directly, apply the stretch yourself. "
           "(nuclei-seg computes the percentiles on a strided sample of pixels for images over 333,333 "
           "pixels, and rounds exact ties to even where this description rounds them down: at most one grey "
           "level on a few pixels.)"
           if mode == "percentile" else "nothing: the image goes to the network as it is."),
        (f"- **Large images.** The network is fully convolutional; run large images in tiles. nuclei-seg "
         f"uses tiles of up to 512 px overlapping by {infer.get('tile_overlap', 32)} px and blends them; "
         f"the outputs declare a halo of {halo} px to crop from each tile edge." if not fixed else
         f"- **Large images.** The network takes {fixed} x {fixed} px only: resize (or tile) to that size."),
        "",
        "## Output",
        "",
        f"- Tensor `probabilities`: `float32`, axes batch, y, x, channel, the input's height and width, "
        f"channels {', '.join(f'`{c}`' for c in channels)}.",
        f"- The first {len(classes)} channels are a softmax over the classes (they sum to 1 per pixel)."
        + (" `boundary` is a rim about "
           f"{config.get('boundary_width', 2)} px wide inside each nucleus' edge, `interior` the rest of the nucleus."
           if "boundary" in classes else ""),
    ]
    if len(channels) > len(classes):
        lines.append("- `distance`: each nucleus' normalised distance to its edge (sigmoid, 0-1); "
                     "`ray_*`: StarDist ray lengths in pixels of the image the network saw.")
    lines += ["", "## From probabilities to nuclei", "",
              "nuclei-seg (`service/postprocess.py`; thresholds from `metadata.json` `postprocess`, tuned "
              f"on: {params_note(metadata.get('postprocess'))}) decodes them so:", ""]
    lines += decoding_steps(params, len(channels), len(classes))
    if by_modality:
        lines += ["", "Images of some modalities (nuclei-seg's `service/modality.py` tells them apart by the "
                  "raw image's background brightness and colour) have thresholds of their own:", "",
                  "| modality | foreground | seed | seed σ | min size |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {p.foreground_threshold:g} | {p.seed_threshold:g} | {p.seed_sigma:g} | "
                  f"{p.min_size} |" for name, p in by_modality.items()]
    lines += ["", "bioimage.io tools (deepImageJ, bioimageio.core, ...) give you the probability maps: "
              "threshold `1 - background` for a semantic mask, or decode as above for instances.", ""]
    lines += ["## Validation", ""]
    lines.append("Scores come from nuclei-seg's `python -m training.evaluate`, which runs the service's whole "
                 "path (normalise -> size -> tiles -> model -> decoding) and reports the DSB2018 score "
                 "(mean over IoU thresholds 0.5-0.95 of TP/(TP+FP+FN) per image), AP@0.5 and, for "
                 "histology, MoNuSeg's AJI, on a held-out validation split (`metadata.json` `split`) and on "
                 "MoNuSeg's official test images.")
    if has_report:
        lines.append("The model's report with all scores is attached as `REPORT.md`.")
    lines.append("To validate on your own data: segment annotated images (run the model as above, or "
                 "`nuclei-seg segment`), and compare instances with the metrics above; check first that "
                 f"your nuclei are about {diameter:g} px across." if diameter else
                 "To validate on your own data: segment annotated images and compare instances with the metrics above.")
    lines.append(f"The test tensors of this package are {sample} and the network's output on it.")
    lines += ["", "## Training data and licences", ""]
    sources = data_sources(metadata)
    for source in sources:
        lines.append(f"- `{source.get('name')}`: {source.get('images', '?')} images, licence "
                     f"{source.get('licence') or 'not recorded'}")
    if not sources:
        lines.append("- not recorded in `metadata.json`")
    lines += ["", f"These weights are licensed **{licence}**"
              + (": they were trained on data under that licence, so they are for non-commercial use and "
                 "models derived from them share it." if licence != PROJECT_LICENCE else
                 " (nuclei-seg's licence): the training data asks no more.")]
    training = metadata.get("training") or {}
    if config:
        lines += ["", f"Training: {training.get('epochs', config.get('epochs'))} epochs × "
                  f"{config.get('steps_per_epoch')} steps of {config.get('batch_size')} crops of "
                  f"{config.get('image_size')} px, learning rate {config.get('learning_rate')} "
                  f"({config.get('lr_schedule', 'constant')}), encoder weights `{config.get('encoder_weights')}`, "
                  f"TensorFlow {metadata.get('tensorflow_version')}, Keras {metadata.get('keras_version')}, "
                  f"commit `{metadata.get('git_commit')}`."]
    lines += ["", "## Limitations", "",
              "- 2D only; one nuclear stain or H&E. Nuclei far from the canonical size are cut into pieces "
              "or missed: rescale first.",
              "- The probabilities are not calibrated confidences; the thresholds above were tuned for "
              "nuclei-seg's decoding.", "",
              "## Citations", ""]
    lines += [f"- {c.text}. doi:{c.doi}" for c in cites]
    lines += ["", f"Authors: {AUTHORS}.", ""]
    return "\n".join(lines)


def params_note(post: dict[str, Any] | None) -> str:
    return str((post or {}).get("tuned_on") or "nothing, nuclei-seg's defaults")


def decoding_steps(params: PostprocessParams, channels: int, classes: int) -> list[str]:
    """Our decoding (``instances_from_probabilities``) in words, with this model's numbers."""
    if params.instances != "watershed" and channels > RAY_START:
        return [f"1. StarDist polygons: pixels (every second one) whose `distance` exceeds "
                f"{params.candidate_threshold:g} propose the polygon their rays describe; non-maximum "
                f"suppression at IoU {params.nms_threshold:g}"
                + (", then a watershed over the foreground (1 - P(background) > "
                   f"{params.foreground_threshold:g}) from the polygons"
                   if params.instances == "polygons_in_foreground" else ""),
                f"2. nuclei under {params.min_size} px are dropped, holes filled, labels renumbered 1..N."]
    steps = [f"1. foreground: 1 - P(background) > {params.foreground_threshold:g};"]
    if classes == 2:
        return steps + ["2. nuclei: its 4-connected components;",
                        f"3. nuclei under {params.min_size} px are dropped, holes filled, labels renumbered 1..N."]
    seed = "`distance`" if channels > classes else "P(interior)"
    steps.append(f"2. seed map: {seed}" + (f", Gaussian-smoothed with σ = {params.seed_sigma:g} px;"
                                           if params.seed_sigma > 0 else ";"))
    steps.append(f"3. seeds: the 4-connected pieces of seed map > {params.seed_threshold:g}, of at least "
                 f"{max(1, params.min_size // 4)} px;")
    steps.append("4. a watershed of -seed map from the seeds, within the foreground, gives each nucleus its pixels "
                 "(touching nuclei stay apart where the boundary class runs between them);")
    if params.border_min_size > 0:
        steps.append(f"5. foreground pieces at the image's edge that no seed reached, of at least "
                     f"{params.border_min_size} px and touching no nucleus, become nuclei;")
    steps.append(f"{len(steps) + 1}. nuclei under {params.min_size} px are dropped, holes filled, labels "
                 "renumbered 1..N.")
    return steps


# --- the description ----------------------------------------------------------------------------

def build_description(metadata: dict[str, Any], files: dict[str, Path], *,
                      channels: list[str], fixed: int | None, halo: int, licence: str, cites: list[Citation],
                      attachments: list[Path]) -> Any:
    """The ``ModelDescr`` (format 0.5) of the package, its files given as local paths."""
    from bioimageio.spec.model import v0_5

    infer = metadata.get("inference") or {}
    classes = [str(c) for c in metadata["classes"]]
    size = fixed if fixed is not None else v0_5.ParameterizedSize(min=MIN_SIDE, step=GRID)
    images, probabilities = v0_5.TensorId("images"), v0_5.TensorId("probabilities")

    def output_axis(axis: str) -> Any:
        ref = v0_5.SizeReference(tensor_id=images, axis_id=v0_5.AxisId(axis))
        if halo:
            return v0_5.SpaceOutputAxisWithHalo(id=v0_5.AxisId(axis), size=ref, halo=halo)
        return v0_5.SpaceOutputAxis(id=v0_5.AxisId(axis), size=ref)

    probability = v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0))
    data = probability if len(channels) == len(classes) else [
        probability if k < len(classes) or name == "distance"
        else v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, None)) for k, name in enumerate(channels)]
    inputs = [v0_5.InputTensorDescr(
        id=images,
        description="RGB image, uint8 (a gray image as three equal channels)",
        axes=[v0_5.BatchAxis(),
              v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=size),
              v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=size),
              v0_5.ChannelAxis(channel_names=["red", "green", "blue"])],
        test_tensor=v0_5.FileDescr(source=files[TEST_INPUT]),
        sample_tensor=v0_5.FileDescr(source=files[SAMPLE_INPUT]),
        data=v0_5.IntervalOrRatioDataDescr(type="uint8", range=(0, 255)),
        preprocessing=preprocessing_steps(infer.get("normalise", "none")),
    )]
    outputs = [v0_5.OutputTensorDescr(
        id=probabilities,
        description=f"per-pixel probabilities of {', '.join(classes)} (softmax)",
        axes=[v0_5.BatchAxis(), output_axis("y"), output_axis("x"), v0_5.ChannelAxis(channel_names=channels)],
        test_tensor=v0_5.FileDescr(source=files[TEST_OUTPUT]),
        sample_tensor=v0_5.FileDescr(source=files[SAMPLE_OUTPUT]),
        data=data,
    )]
    diameter = infer.get("canonical_diameter")
    description = (f"U-Net (MobileNetV2 encoder) giving per-pixel probabilities of {', '.join(classes)} for 2D "
                   "nuclei in fluorescence, bright-field and H&E images. Probabilities, not instances: see the "
                   "documentation for nuclei-seg's seeded-watershed decoding"
                   + (f" and rescale images so nuclei are about {diameter:g} px across." if diameter else "."))
    config = {
        "nuclei_seg": {
            "metadata_format_version": metadata.get("format_version", SUPPORTED_FORMAT),
            "classes": classes,
            "canonical_diameter": diameter,
            "normalise": infer.get("normalise"),
            "tile_overlap": infer.get("tile_overlap"),
            "postprocess": metadata.get("postprocess"),
            "postprocess_by_modality": metadata.get("postprocess_by_modality"),
            "training_data": [{k: s.get(k) for k in ("name", "images", "licence")} for s in data_sources(metadata)],
            "git_commit": metadata.get("git_commit"),
        },
    }
    return v0_5.ModelDescr(
        name=f"nuclei-seg nucleus U-Net MobileNetV2 ({len(classes)} classes)",
        description=description[:512],
        authors=[v0_5.Author(name=AUTHORS)],
        cite=[v0_5.CiteEntry(text=c.text, doi=v0_5.Doi(c.doi)) for c in cites],
        license=v0_5.LicenseId(licence),
        tags=TAGS,
        documentation=v0_5.FileDescr(source=files[DOCUMENTATION]),
        covers=[v0_5.FileDescr(source=files[COVER])],
        attachments=[v0_5.FileDescr(source=path) for path in attachments],
        inputs=inputs,
        outputs=outputs,
        weights=v0_5.WeightsDescr(tensorflow_saved_model_bundle=v0_5.TensorflowSavedModelBundleWeightsDescr(
            source=files[WEIGHTS],
            tensorflow_version=v0_5.Version(str(metadata.get("tensorflow_version") or tensorflow_version())),
            comment="the nuclei-seg SavedModel: signature serving_default, images (uint8 NHWC) -> "
                    "probabilities (float32 NHWC); input scaling and softmax inside",
        )),
        config=config,
    )


def tensorflow_version() -> str:
    import tensorflow as tf

    return tf.__version__


# --- validation ---------------------------------------------------------------------------------

def validate_package(source: Path) -> Any:
    """Load ``source`` (an rdf.yaml or a package zip) with ``bioimageio.spec``, file checks on, offline.

    The description holds no URL, so nothing is fetched; raises :class:`ExportError` with the
    validator's reason when it is not valid. Returns the loaded description.
    """
    from bioimageio.spec import InvalidDescr, load_description

    descr = load_description(source, perform_io_checks=True)
    summary = descr.validation_summary
    if isinstance(descr, InvalidDescr) or summary.status == "failed":
        raise ExportError(f"bioimage.io validation of {source} failed:\n{summary.format()}")
    return descr


# --- the export ---------------------------------------------------------------------------------

def export_bioimageio(model_dir: Path | str, out_dir: Path | str, *, sample: Path | str | None = None,
                      size: int = DEFAULT_SIZE, licence: str | None = None, zip_path: Path | str | None = None,
                      show_summary: bool = False) -> Path:
    """Write the bioimage.io package of ``model_dir`` to the folder ``out_dir`` (and ``zip_path``).

    The test input is ``sample`` (an image file; centre-cropped to at most ``size`` px, multiples of
    32) or a synthetic image of nuclei at the model's canonical size; the test output is the
    SavedModel's own output on it, run by TensorFlow after the described pre-processing
    (:func:`described_preprocessing`: the service's ``normalise`` as bioimage.io tools compute it).
    The package is built in a temporary sibling folder, validated, and only then renamed into place
    (an old ``out_dir`` is replaced); ``zip_path`` likewise. Returns ``out_dir``.
    """
    import tifffile
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder
    from PIL import Image

    from service.pipeline import segment
    from service.runtime import RuntimeOptions
    from training.export import swap_into_place

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if size % GRID or size < MIN_SIDE:
        raise ExportError(f"size must be a multiple of {GRID} of at least {MIN_SIDE}, not {size}")
    licence = licence or weights_licence(SegmentationModel.without_network(model_dir).spec.metadata)
    model = SegmentationModel.load(model_dir, RuntimeOptions(runtime="tensorflow"))
    metadata = model.spec.metadata
    fixed = model.spec.image_size if model.fixed_input else None
    diameter = model.spec.canonical_diameter
    if sample is not None:
        image = crop_for_network(read_sample(Path(sample)), size, fixed)
        sample_text = f"a {image.shape[0]}x{image.shape[1]} px crop of `{Path(sample).name}`"
    else:
        side = fixed or size
        image = synthetic_sample(side, diameter or 20.0)
        sample_text = (f"a synthetic {side}x{side} px fluorescence-like image of nuclei about "
                       f"{diameter or 20.0:g} px across")
    network_input = described_preprocessing(image, model.spec.normalise)
    output = np.asarray(model.predict_now(network_input[None]), np.float32)
    if output.shape[:3] != (1, *image.shape[:2]):
        raise ExportError(f"the network returned {output.shape} for a {image.shape} input")
    labels = segment(image, model).labels  # the service's whole path, for the cover
    channels = channel_names(metadata, output.shape[-1])
    cites = citations(metadata)
    halo = int((metadata.get("inference") or {}).get("tile_overlap", 32)) // 2 if fixed is None else 0
    report = model_dir / "REPORT.md"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.files-", dir=out_dir.parent))
    package = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    zip_tmp = None
    try:
        files = {name: staging / name for name in (TEST_INPUT, TEST_OUTPUT, SAMPLE_INPUT, SAMPLE_OUTPUT,
                                                   COVER, DOCUMENTATION, WEIGHTS)}
        np.save(files[TEST_INPUT], image[None])
        np.save(files[TEST_OUTPUT], output)
        Image.fromarray(image).save(files[SAMPLE_INPUT])
        tifffile.imwrite(files[SAMPLE_OUTPUT], output[0], photometric="minisblack", planarconfig="contig")
        cover_png(image, labels, files[COVER])
        zip_saved_model(model_dir, files[WEIGHTS])
        files[DOCUMENTATION].write_text(documentation(
            metadata, channels=channels, licence=licence, cites=cites, fixed=fixed, halo=halo,
            sample=sample_text, has_report=report.is_file()), encoding="utf-8")
        attachments = [staging / METADATA_FILE]
        shutil.copyfile(model_dir / METADATA_FILE, attachments[0])
        if report.is_file():
            attachments.append(staging / "REPORT.md")
            shutil.copyfile(report, attachments[-1])
        try:
            descr = build_description(metadata, files, channels=channels, fixed=fixed,
                                      halo=halo, licence=licence, cites=cites, attachments=attachments)
        except ValueError as error:  # pydantic's ValidationError: a field the format refuses (e.g. --license)
            raise ExportError(f"invalid bioimage.io description: {error}") from None
        save_bioimageio_package_as_folder(descr, output_path=package)
        validate_package(package / "rdf.yaml")
        if zip_path is not None:
            zip_path = Path(zip_path)
            zip_tmp = zip_path.with_name(f".{zip_path.name}.tmp")
            save_bioimageio_package(package / "rdf.yaml", output_path=zip_tmp)
            validate_package(zip_tmp)
        swap_into_place(package, out_dir)
        if zip_tmp is not None:
            zip_tmp.replace(zip_path)
        if show_summary:  # validated again where it now lies, so the summary names the final path
            validate_package(out_dir / "rdf.yaml").validation_summary.display()
    except BaseException:
        shutil.rmtree(package, ignore_errors=True)
        if zip_tmp is not None:
            zip_tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/default"),
                        help="model folder (SavedModel + metadata.json)")
    parser.add_argument("--out", type=Path, required=True, help="package folder to write (replaced if it exists)")
    parser.add_argument("--zip", nargs="?", const=True, default=None, metavar="PATH",
                        help="also write the package as one zip (default PATH: OUT.zip)")
    parser.add_argument("--sample", type=Path, default=None,
                        help="image for the test tensors and cover (default: a synthetic image of nuclei)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="largest side of the test image (multiple of 32)")
    parser.add_argument("--license", dest="licence", default=None,
                        help="SPDX licence of the weights (default: from the training data's licences)")
    args = parser.parse_args(argv)
    zip_path = None if args.zip is None else (
        args.out.with_name(args.out.name + ".zip") if args.zip is True else Path(args.zip))
    try:
        out = export_bioimageio(args.model, args.out, sample=args.sample, size=args.size, licence=args.licence,
                                zip_path=zip_path, show_summary=True)
    except (ExportError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"bioimage.io package: {out}/rdf.yaml" + (f" and {zip_path}" if zip_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
