"""Killing training in the middle of an export never leaves a half model where the service looks."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from service.model import SegmentationModel

SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import tensorflow as tf
    from tests.conftest import tiny_config
    from training.export import export_model
    from training.model import build_unet

    real_save = tf.saved_model.save

    def slow_save(*args, **kwargs):
        real_save(*args, **kwargs)          # the variables are half-way to disk...
        Path(sys.argv[2]).write_text("saving")
        time.sleep(600)                     # ...and we are killed before the rename

    tf.saved_model.save = slow_save
    export_model(build_unet(tiny_config("best")), Path(sys.argv[1]), {"format_version": 1}, fixed_size=None)
""")


def test_sigkill_during_export_keeps_the_old_model(tile_model_dir: Path, tmp_path: Path):
    import shutil

    target = tmp_path / "model"
    shutil.copytree(tile_model_dir, target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    flag = tmp_path / "saving"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(target), str(flag)], cwd=root)
    try:
        deadline = time.time() + 300
        while not flag.exists():
            assert proc.poll() is None, "export script died early"
            assert time.time() < deadline, "export never reached the save"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before  # byte for byte the old model
    SegmentationModel.load(target)  # and it still serves
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.tmp-")]
    assert leftovers, "the half-written export should sit in a hidden temp folder"
