"""Where the time of one `icmd_auto` command goes: its main() with the stages' functions timed.

    python benchmarks/stages.py PROFILE.json predict --input ct.nii.gz --output thin.nii.gz --factor 4

runs ``icmd_auto.cli.main`` on the arguments after PROFILE.json, as ``python -m icmd_auto`` would,
in a process where the functions that make up prediction are wrapped by a clock, and writes
the seconds per stage to PROFILE.json. Times are exclusive (a stage called inside another is
subtracted from it), so the stages add up to the time in this process:

    imports            importing icmd_auto (torch, MONAI, the CLI)
    read               decoding the input (fingerprint.load_case: the input check's read)
    input checks       integrity checks and fingerprint of the input, less the read
    zero-shot plan     planning and writing the zero-shot bundle, less its reads and checks
    model load         the bundle's inference workflow: configs parsed, network built, weights
    bundle read        the bundle's loader (LoadImaged): a second decode, where it reads a path
    standardise        the HU copy and the intensity standardisation (CopyItemsd, ScaleIntensityRanged)
    synthesis          the inferer (PlaneInferer: every network call)
    finalize           FinalizeSynthesisd: crop, HU, output dtype, known slices, geometry
    write              SaveImaged: the output file (gzip included)
    rest               everything else in main(): arguments, the engine, commit, clean-up

speed.py runs it as the measured command; what the wall clock of the process adds (interpreter
start, exit) is the wall time less ``total``.

A variation of the inference settings (speed.py's rows) is given in the environment, as JSON:

    ICMD_STAGES_INFERER='{"plane_chunk": 2, "channels_last": false, "tune": false, "amp": ""}'
        keyword arguments that replace the bundle's PlaneInferer arguments (plans.json's), in any
        bundle the command runs, the old commit's too
    ICMD_STAGES_THREADS=1
        torch's intra-op threads during the synthesis (the inferer sets the process's cores)
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

_START = time.perf_counter()

STAGES = (
    "imports",
    "read",
    "input checks",
    "zero-shot plan",
    "model load",
    "bundle read",
    "standardise",
    "synthesis",
    "finalize",
    "write",
    "rest",
)


class StageClock:
    """Exclusive seconds per stage of the wrapped functions (nested calls are subtracted)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inner: list[float] = []

    def timed(self, function, stage: str):
        clock = self

        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            clock._inner.append(0.0)
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = clock._inner.pop()
                clock.seconds[stage] += elapsed - inner
                clock.calls[stage] += 1
                if clock._inner:
                    clock._inner[-1] += elapsed

        timed.stage_clock = stage
        return timed

    def wrap(self, owner, name: str, stage: str) -> None:
        """Time ``owner.name`` (a module's function or a class's method) as ``stage``, once."""
        function = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if function is None or getattr(function, "stage_clock", None):
            return
        setattr(owner, name, self.timed(function, stage))


def plane_calls() -> list:
    """What the inferer's tuner chose in this process (planes per call, layout, ms per plane tried)."""
    chosen = []
    for module in list(sys.modules.values()):
        choices = getattr(module, "plane_call_choices", None)
        if callable(choices) and module.__name__.endswith("inferers"):
            for size, channels_last, seconds in choices().values():
                tried = {f"{s} {'cl' if c else 'nchw'}": round(t * 1e3, 1) for (s, c), t in seconds.items()}
                chosen.append({"planes": size, "channels_last": channels_last, "ms_per_plane": tried})
    return chosen


def run(profile: Path, argv: list[str]) -> int:
    from monai import transforms

    from icmd_auto import cli, fingerprint, integrity, predict, runner

    clock = StageClock()
    clock.seconds["imports"] = time.perf_counter() - _START
    # the input's decode, wherever a module calls it from (each imported the name)
    for module in (fingerprint, integrity, predict):
        clock.wrap(module, "load_case", "read")
    for module in (integrity, predict):
        for name in ("check_image", "check_volume"):
            clock.wrap(module, name, "input checks")
    clock.wrap(predict, "zero_shot_work", "zero-shot plan")
    clock.wrap(runner.InferenceSession, "_start", "model load")
    clock.wrap(transforms.LoadImaged, "__call__", "bundle read")
    clock.wrap(transforms.CopyItemsd, "__call__", "standardise")
    clock.wrap(transforms.ScaleIntensityRanged, "__call__", "standardise")
    clock.wrap(transforms.SaveImaged, "__call__", "write")
    bundle_scripts = runner.bundle_scripts

    overrides = json.loads(os.environ.get("ICMD_STAGES_INFERER") or "{}")
    threads = int(os.environ.get("ICMD_STAGES_THREADS") or 0)

    def varied(inferers) -> None:
        """The bundle's PlaneInferer with the variation's arguments, its threads the variation's."""
        if threads:  # the inferer sets torch's threads to this (cpu_threads before the runtime module)
            for name in ("cpu_cores", "cpu_threads"):
                if hasattr(inferers, name):
                    setattr(inferers, name, lambda: threads)
        init = inferers.PlaneInferer.__init__
        if not overrides or getattr(init, "varied", False):
            return

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            for key, value in overrides.items():
                setattr(self, key, int(value) if key == "plane_chunk" else value)

        __init__.varied = True
        inferers.PlaneInferer.__init__ = __init__

    def bundle_scripts_timed(bundle):  # the bundle's own classes, under their private package
        name = bundle_scripts(bundle)
        package = sys.modules[name]
        varied(package.inferers)
        clock.wrap(package.inferers.PlaneInferer, "__call__", "synthesis")
        clock.wrap(package.transforms.FinalizeSynthesisd, "__call__", "finalize")
        if hasattr(package.io, "LoadVolumed"):
            clock.wrap(package.io.LoadVolumed, "__call__", "bundle read")
        return name

    runner.bundle_scripts = bundle_scripts_timed
    code = clock.timed(cli.main, "rest")(argv)
    total = time.perf_counter() - _START
    profile.write_text(
        json.dumps(
            {
                "argv": argv,
                "exit_code": code,
                "total_s": total,
                "stages_s": {s: clock.seconds.get(s, 0.0) for s in STAGES},
                "calls": dict(clock.calls),
                "plane_calls": plane_calls(),
            },
            indent=1,
        )
    )
    return code


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
