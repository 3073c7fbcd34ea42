"""The evaluation report: per-case metrics of the method and the classical baselines, as JSON."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..evaluation import BASELINES, interpolate_z, score


class SynthesisReport:
    """Score every evaluated case and write ``output_path`` when the evaluator completes.

    Reads from each (decollated) item of the engine's output and batch: ``pred`` (thin grid,
    HU), ``label`` (the thin ground truth, HU) and ``thick_key`` (the simulated thick input, HU). The JSON has the
    factor, one entry per case (the method and each baseline) and the means, including the
    gain of the method over linear interpolation in synthesized-slice PSNR.
    """

    def __init__(
        self,
        output_path: str,
        factor: int,
        thick_key: str = "image_hu",
        baselines: list[str] | tuple[str, ...] = BASELINES,
        name: str | None = None,
    ):
        self.output_path, self.factor, self.thick_key = output_path, factor, thick_key
        self.baselines = list(baselines)
        self.cases: list[dict] = []
        self.logger = logging.getLogger(name or __name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.score_iteration)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def score_iteration(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for out, batch in zip(outputs, batches):
            item = {**batch, **out}
            reference = torch.as_tensor(item["label"])[0].double()
            case = {
                "image": str(getattr(item["label"], "meta", {}).get("filename_or_obj", "")),
                "icmd": score(torch.as_tensor(item["pred"])[0].double(), reference, self.factor),
            }
            thick = torch.as_tensor(item[self.thick_key])[0].double()
            for method in self.baselines:
                case[method] = score(interpolate_z(thick, self.factor, method), reference, self.factor)
            self.cases.append(case)
            gain = case["icmd"]["psnr_syn"] - case["linear"]["psnr_syn"] if "linear" in case else float("nan")
            self.logger.info(
                f"{os.path.basename(case['image'])}: PSNR(syn) {case['icmd']['psnr_syn']:.2f} dB "
                f"({gain:+.2f} dB vs linear)"
            )

    def summary(self) -> dict:
        methods = ["icmd", *self.baselines]
        mean = {
            m: {k: float(np.mean([c[m][k] for c in self.cases])) for k in self.cases[0][m]} for m in methods
        }
        if "linear" in mean:
            mean["gain_over_linear_psnr_syn"] = mean["icmd"]["psnr_syn"] - mean["linear"]["psnr_syn"]
        return {"factor": self.factor, "num_cases": len(self.cases), "mean": mean, "cases": self.cases}

    def write(self, engine: Engine) -> None:
        if not self.cases:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.output_path)), exist_ok=True)
        tmp = self.output_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary(), f, indent=2)
        os.replace(tmp, self.output_path)
