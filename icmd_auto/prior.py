"""CT priors: G_c/G_s pretrained once per factor (``icmd_auto pretrain``), shipped or a site's own.

A prior is ``priors/prior_x{r}.pt`` (an ICMDNet state dict: the ``inplane`` recipe's network)
with its card ``priors/prior_x{r}.json`` (architecture, the intensity standardisation it was
trained with, data and licence, the command, the validation curve). The planner uses it three
ways (its ``init`` decision): zero-shot (predict with no plan and no training), warm start
(training starts from it) or not at all (``--init scratch``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ICMDError

PRIOR_DIR = Path(__file__).resolve().with_name("priors")
# another folder of priors (``icmd_auto pretrain``'s output: a site's own, or a leave-one-out prior);
# ``--prior DIR`` of plan and predict sets it for the process
PRIOR_DIR_VARIABLE = "ICMD_AUTO_PRIORS"
INITS = ("prior", "scratch")


@dataclass(frozen=True)
class Prior:
    factor: int
    weights: Path
    card: dict

    @property
    def preset(self) -> str:
        return self.card["preset"]

    @property
    def architecture(self) -> dict:
        return self.card["architecture"]

    @property
    def intensity(self) -> dict:
        return self.card["intensity"]

    @property
    def recipe(self) -> str:
        return self.card["recipe"]

    def describe(self) -> str:
        best = self.card["validation"]["best"]
        names = list(self.card["data"])
        data = (
            ", ".join(names) if len(names) <= 4 else f"{len(names)} CT volumes ({', '.join(names[:3])}, ...)"
        )
        return (
            f"{self.weights.name}: preset {self.preset!r}, {self.card['iterations']} iterations on "
            f"{data} ({self.card['device']}); held-out in-plane validation "
            f"+{best['psnr'] - best['linear']:.2f} dB over linear"
        )


def prior_dir() -> Path:
    """The priors' folder: ``$ICMD_AUTO_PRIORS`` if set, else the package's own."""
    return Path(os.environ[PRIOR_DIR_VARIABLE]) if os.environ.get(PRIOR_DIR_VARIABLE) else PRIOR_DIR


def use_directory(directory: str | Path) -> Path:
    """Take the priors of ``directory`` (a folder ``icmd_auto pretrain`` wrote) instead of the
    shipped ones, for this process (``--prior DIR``); one line where it holds none."""
    directory = Path(directory).expanduser().absolute()
    found = available(directory) if directory.is_dir() else {}
    if not found:
        raise ICMDError(f"--prior {directory}: no prior (prior_xR.pt with its card prior_xR.json) in it")
    os.environ[PRIOR_DIR_VARIABLE] = str(directory)
    return directory


@contextlib.contextmanager
def directory_in_use(directory: str | Path) -> Iterator[Path]:
    """``use_directory`` for a block (a benchmark's leave-one-out prior): the folder in use before
    comes back after it."""
    previous = os.environ.get(PRIOR_DIR_VARIABLE)
    try:
        yield use_directory(directory)
    finally:
        if previous is None:
            os.environ.pop(PRIOR_DIR_VARIABLE, None)
        else:
            os.environ[PRIOR_DIR_VARIABLE] = previous


def available(directory: Path | None = None) -> dict[int, Prior]:
    """The priors in ``directory`` (default: prior_dir()), by factor."""
    directory = directory or prior_dir()
    priors = {}
    for card_path in sorted(directory.glob("prior_x*.json")):
        weights = card_path.with_suffix(".pt")
        if weights.is_file():
            card = json.loads(card_path.read_text())
            priors[int(card["factor"])] = Prior(int(card["factor"]), weights, card)
    return priors


def prior_for(factor: int, directory: Path | None = None) -> Prior | None:
    return available(directory).get(int(factor))
