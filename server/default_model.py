"""The model `python -m server` serves when given no --checkpoint: µLM's 2-digit adder.

It needs no data and no network: the training data is made on the fly. The first start trains it (about a
quarter of a minute on 2 cores, with a progress bar on a terminal, a few progress lines in a log) into the cache;
later starts load it from there.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ulm.checkpoint import CONFIG_FILE
from ulm.train import train
from ulm.util import cache_root

log = logging.getLogger(__name__)
PRESET = "adder"


def ensure_default_checkpoint() -> Path:
    """Return the cached default checkpoint, training it first if it is not there yet."""
    target = cache_root() / "models" / f"default-{PRESET}"
    if (target / CONFIG_FILE).is_file():
        return target
    log.info("no default model in %s yet: training the %r preset once (about 15 s on 2 cores)", target, PRESET)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".train-") as run_dir:
        best = train(PRESET, run_dir)
        staged = Path(run_dir) / "default"
        shutil.copytree(best, staged)
        os.replace(staged, target)  # a half-trained model never appears at `target`
    log.info("default model ready in %s", target)
    return target
