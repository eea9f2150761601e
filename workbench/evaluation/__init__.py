"""Held-out evaluation of a teacher and its students, and the metrics the field reports.

One room per concern:

- ``core``: samples, per-sample scores with bootstrap intervals, the toy checker's verdicts,
  PSNR/SSIM, the ``Evaluator`` and its JSON record (this package's names are core's, so
  ``from workbench import evaluation as ev; ev.Evaluator`` works as it always did);
- ``suite``: which metrics an evaluation computes and the protocol written beside them;
- ``distribution``: FID and KID (torchmetrics) on a chosen feature extractor;
- ``clip``: CLIP score and PickScore with a CLIP model the user names;
- ``perceptual``: LPIPS to the teacher's image;
- ``prompts``: prompt sets from ``.txt``/``.jsonl`` files;
- ``images``: the teacher's image cache and the images kept beside the scores;
- ``table``: every run's and export's scores in one pandas table (CSV in and out).
"""

from workbench.evaluation.core import *  # noqa: F403
from workbench.evaluation.core import (
    _RECORD_KEYS,  # noqa: F401  (tests read the record's keys)
    __all__,  # noqa: F401
)
