"""The parity gate: may a reduced precision serve? Its scores against TensorFlow f32, on the same images.

    python -m training.parity --model models/default --data DSB --data MONUSEG/train \\
        --test MONUSEG/test --precision bf16 --out docs/parity.json --record

Each precision (OpenVINO bf16 / int8, or OpenVINO f32 itself) is run over the model's validation
images and, with ``--test``, an external test set, through the service's own ``segment``, as is
the reference (TensorFlow f32 where installed, else OpenVINO f32). A precision passes when its
DSB2018 validation score and its test AJI are both within ``TOLERANCE`` of the reference's. Label
agreement says how alike the outputs are: the share of images whose labels are identical, and the
mean AP@0.5 of the precision's nuclei scored against the reference's.

``--record`` writes the verdicts into the model's ``metadata.json`` (``runtime.parity``): the
service's ``NUCLEI_PRECISION=auto`` serves bf16 only for a model whose bf16 passed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.model import ModelLoadError, SegmentationModel
from service.runtime import RuntimeOptions, RuntimeUnavailable
from training.data import DataError, NucleiDataset, load_sources, parse_source
from training.evaluate import score_samples, split_samples, summarise
from training.export import update_metadata, write_text_atomic
from training.matching import score_image

#: Largest drop (DSB2018 validation score, test AJI) a precision may cost against f32 and still serve.
TOLERANCE = 0.005


@dataclass
class Run:
    """One runtime x precision over one image set: its summary and its labels by image id."""

    summary: dict
    labels: dict[str, np.ndarray]


def runs(model_dir: Path, sets: dict[str, NucleiDataset], runtime: RuntimeOptions) -> dict[str, Run]:
    """Segment and score every image of each set with the model compiled once for ``runtime``."""
    model = SegmentationModel.load(model_dir, runtime)
    scored = {name: score_samples(dataset, model)[:2] for name, dataset in sets.items()}
    return {name: Run(summarise(rows), labels) for name, (rows, labels) in scored.items()}


def agreement(candidate: Run, reference: Run) -> dict:
    """How alike two runs' labels are: identical images, and the candidate's AP@0.5 against the reference."""
    ids = sorted(reference.labels)
    identical = [np.array_equal(candidate.labels[i], reference.labels[i]) for i in ids]
    ap50 = [score_image(reference.labels[i], candidate.labels[i]).ap50 for i in ids]
    return {"identical_images": float(np.mean(identical)), "ap50_vs_reference": float(np.mean(ap50))}


def reference_options(threads: int) -> RuntimeOptions:
    """TensorFlow f32 where it is installed (the gate's own reference), else OpenVINO f32."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return RuntimeOptions("openvino", "f32", threads)
    return RuntimeOptions("tensorflow", "f32", threads)


def gate(model_dir: Path, validation: NucleiDataset, test: NucleiDataset | None, precisions: list[str],
         models: dict[str, Path], threads: int = 0) -> dict:
    """Verdict per precision: validation (and test) scores beside the reference's, agreement, passed."""
    reference = reference_options(threads)
    sets = {"validation": validation, **({"test": test} if test is not None else {})}
    refs = runs(model_dir, sets, reference)
    report = {"reference": {"runtime": reference.runtime, "precision": reference.precision,
                            **{name: brief(r.summary) for name, r in refs.items()}},
              "tolerance": TOLERANCE, "precisions": {}}
    for precision in precisions:
        options = RuntimeOptions("openvino", precision, threads)
        done = runs(models.get(precision, model_dir), sets, options)
        verdict = {name: {**brief(r.summary), **agreement(r, refs[name])} for name, r in done.items()}
        drops = {"dsb_validation": refs["validation"].summary["dsb_score"] - done["validation"].summary["dsb_score"]}
        if "test" in done:
            drops["aji_test"] = refs["test"].summary["aji"] - done["test"].summary["aji"]
        verdict["drops"] = drops
        verdict["passed"] = all(abs(d) <= TOLERANCE for d in drops.values())
        report["precisions"][precision] = verdict
        print(f"{precision}: {verdict}")
    return report


def brief(summary: dict) -> dict:
    """The scores the gate compares and reports."""
    return {k: summary[k] for k in ("images", "dsb_score", "ap50", "aji", "predicted_nuclei", "seconds_per_megapixel")}


def markdown(report: dict) -> str:
    """The runtime x precision quality table."""
    lines = ["| runtime, precision | DSB2018 validation | AP@0.5 | identical labels | AP@0.5 vs reference "
             "| test AJI | test DSB2018 | passed |", "|---|---|---|---|---|---|---|---|"]
    ref = report["reference"]
    test = ref.get("test", {})
    lines.append(f"| {ref['runtime']} {ref['precision']} (reference) | {ref['validation']['dsb_score']:.4f} | "
                 f"{ref['validation']['ap50']:.4f} | - | - | {test.get('aji', float('nan')):.4f} | "
                 f"{test.get('dsb_score', float('nan')):.4f} | - |")
    for name, v in report["precisions"].items():
        val, tst = v["validation"], v.get("test", {})
        lines.append(f"| openvino {name} | {val['dsb_score']:.4f} | {val['ap50']:.4f} | {val['identical_images']:.3f} | "
                     f"{val['ap50_vs_reference']:.4f} | {tst.get('aji', float('nan')):.4f} | "
                     f"{tst.get('dsb_score', float('nan')):.4f} | {'yes' if v['passed'] else 'no'} |")
    return "\n".join(lines) + "\n"


def record(model_dir: Path, report: dict, models: dict[str, Path]) -> None:
    """Store each precision's verdict in the metadata of the folder it ran from (``runtime.parity``), for ``auto``:
    int8's in the quantized copy, the others' in the model itself."""
    for name, verdict in report["precisions"].items():
        folder = models.get(name, model_dir)
        metadata = json.loads((folder / "metadata.json").read_text())
        runtime = dict(metadata.get("runtime") or {})
        runtime["parity"] = {**(runtime.get("parity") or {}), name: {
            "passed": verdict["passed"], "drops": verdict["drops"],
            "reference": f"{report['reference']['runtime']} {report['reference']['precision']}"}}
        update_metadata(folder, {"runtime": runtime})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model folder")
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                        help="the model's training sources (its validation images are scored); repeatable")
    parser.add_argument("--test", action="append", default=[], metavar="[NAME=]PATH",
                        help="an external test set, scored whole (AJI gate); repeatable")
    parser.add_argument("--precision", action="append", choices=("f32", "bf16", "int8"), required=True,
                        help="OpenVINO precision to gate; repeatable")
    parser.add_argument("--int8-model", type=Path, help="the quantized copy of --model (training.quantize)")
    parser.add_argument("--threads", type=int, default=0, help="network threads (default: the CPUs allowed)")
    parser.add_argument("--out", type=Path, help="JSON report (a .md table is written beside it)")
    parser.add_argument("--record", action="store_true", help="store the verdicts in the model's metadata")
    args = parser.parse_args(argv)
    models = {"int8": args.int8_model} if args.int8_model else {}
    try:
        validation = split_samples(SegmentationModel.without_network(args.model), args.data, "validation")
        test = load_sources([parse_source(t) for t in args.test]) if args.test else None
        report = gate(args.model, validation, test, args.precision, models, args.threads)
    except (DataError, ModelLoadError, RuntimeUnavailable) as error:
        sys.exit(f"error: {error}")
    report["command"] = "python -m training.parity " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(report, indent=2))
        write_text_atomic(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    if args.record:
        record(args.model, report, models)


if __name__ == "__main__":
    main()
