"""Running the generated bundle's workflows: training in a subprocess, inference in-process.

Training runs ``python -m monai.bundle run`` in a child process, exactly the command a MONAI
user would type, so what icmd_auto trains is what the bundle trains. Inference and evaluation
run the same configs in-process through ``monai.bundle.ConfigWorkflow`` (no second start-up).
"""

from __future__ import annotations

import configparser
import contextlib
import difflib
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from .errors import ICMDError

logger = logging.getLogger("icmd_auto")


def bundle_dir(work: str | Path) -> Path:
    bundle = Path(work).expanduser().absolute() / "bundle"
    if not (bundle / "configs" / "train.json").is_file():
        raise ICMDError(
            f"{Path(work)}: no bundle found (expected {bundle}/configs/train.json); run `icmd_auto plan` first"
        )
    return bundle


def trained_model(bundle: Path) -> Path:
    model = bundle / "models" / "model.pt"
    if not model.is_file():
        raise ICMDError(f"{model}: no trained model; run `icmd_auto train --work {bundle.parent}` first")
    return model


PRIVATE_PREFIX = "_icmd_bundle_"


def bundle_scripts(bundle: Path) -> str:
    """Import ``<bundle>/scripts`` under a private package name; returns that name.

    The bundle's configs name ``scripts.…`` targets, which ``python -m monai.bundle run`` resolves
    with the bundle on sys.path. In this process the package is imported as
    ``_icmd_bundle_<digest>`` (of the folder's path and its modules' contents) instead, so a
    caller's own ``scripts`` module is neither replaced nor removed, and a bundle whose code
    changed is imported afresh. The modules import each other relatively, so they work under
    any package name.
    """
    root = (Path(bundle) / "scripts").resolve()
    digest = hashlib.sha1(str(root).encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    name = PRIVATE_PREFIX + digest.hexdigest()[:16]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, root / "__init__.py", submodule_search_locations=[str(root)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
            raise
    return name


def _scripts_targets(node, prefix: str = "") -> dict[str, str]:
    """``{id: target}`` of every ``_target_`` of a config that names the bundle's ``scripts``."""
    found = {}
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target.startswith("scripts."):
            found[f"{prefix}_target_"] = target
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        found.update(_scripts_targets(value, f"{prefix}{key}#"))
    return found


def private_targets(bundle: Path, config_files: list[str]) -> dict[str, str]:
    """Overrides that point the configs' ``scripts.…`` targets at the bundle's private package.

    Passed with the other overrides to ConfigWorkflow, ConfigParser.update or MONAI's bundle
    functions (``ckpt_export``, ``verify_net_in_out``), they run the bundle in this process
    without a module named ``scripts``; the files on disk keep ``scripts.…`` for MONAI users.
    """
    from monai.bundle import ConfigParser

    name = bundle_scripts(bundle)
    parser = ConfigParser()
    parser.read_config(f=[str(Path(bundle) / "configs" / c) for c in config_files])
    return {key: name + target[len("scripts") :] for key, target in _scripts_targets(parser.get()).items()}


@contextlib.contextmanager
def _sys_path_kept():
    """Take back what a workflow adds to sys.path (the configs' ``initialize`` and ConfigWorkflow.run
    put the bundle there for ``scripts``, which this process imports under its private name)."""
    before = list(sys.path)
    try:
        yield
    finally:
        if sys.path != before:
            sys.path[:] = before


# `monai.bundle run` options that are not config keys but may be passed like overrides
RUN_OPTIONS = ("tracking",)


def _config_ids(node, prefix: str = "") -> list[str]:
    """Every id of a config (``a``, ``a#b``, ``a#0``), as MONAI's ConfigParser addresses them."""
    ids = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        path = f"{prefix}{key}"
        ids.append(path)
        ids += _config_ids(value, path + "#")
    return ids


def check_overrides(bundle: Path, config_files: list[str], overrides: dict) -> None:
    """Refuse an override whose key the configs do not have, before anything runs.

    MONAI would add an unknown key silently, so a typo (``--icmd#gama``) would change nothing
    and train or predict with the default.
    """
    from monai.bundle import ConfigParser

    unknown = [key for key in overrides if key not in RUN_OPTIONS]
    if not unknown:
        return
    parser = ConfigParser()
    parser.read_config(f=[str(bundle / "configs" / name) for name in config_files])
    unknown = [key for key in unknown if key not in parser]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, _config_ids(parser.get()), n=1, cutoff=0.7)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise ICMDError(
            f"--{key}: no such key in {' + '.join(config_files)} of {bundle}{hint}; "
            "overrides can only change keys the bundle's configs have"
        )


def config_value(bundle: Path, config_files: list[str], key: str, **overrides):
    """A config value as the workflow would see it (overrides applied, expressions evaluated)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=[str(bundle / "configs" / name) for name in config_files])
    parser.update({"bundle_root": str(bundle), **private_targets(bundle, config_files), **overrides})
    with _sys_path_kept():
        return parser.get_parsed_content(key)


def error_summary(error: BaseException) -> str:
    """``Type: message`` of the innermost cause (MONAI wraps errors in 'Failed to evaluate ...')."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class WorkflowError(ICMDError):
    """The bundle workflow raised; the message is the innermost cause, the traceback is chained."""


class _ReportedByCaller(logging.Filter):
    """Drops the workflow's own log of an exception it is about to raise.

    MONAI's StatsHandler logs every engine exception with its traceback and Ignite logs a line
    before re-raising; here the exception reaches the caller, which reports it once (one line,
    or the traceback with --debug).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return False
        return not (record.levelno >= logging.ERROR and record.name.startswith("ignite.engine"))


class _LoggingKept:
    """The state of the loggers a workflow reconfigures in this process, to put back afterwards.

    ConfigWorkflow applies the bundle's logging.conf (the root logger at INFO with a handler of
    its own, and the loggers the file names) and a quiet session raises the root logger and
    MONAI's workflow logger to WARNING; a program that uses icmd_auto keeps its own logging.
    """

    def __init__(self, logging_conf: Path):
        conf = configparser.ConfigParser(interpolation=None)
        conf.read(logging_conf)
        keys = [k.strip() for k in conf.get("loggers", "keys", fallback="").split(",")]
        named = [conf.get(f"logger_{k}", "qualname", fallback=None) for k in keys if k and k != "root"]
        loggers = [logging.getLogger()] + [
            logging.getLogger(name) for name in ("monai.bundle.workflows", *named) if name
        ]
        self.saved = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]

    def restore(self) -> None:
        for lg, level, handlers, propagate, disabled in self.saved:
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled


def _all_handlers() -> set[logging.Handler]:
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return {h for lg in loggers for h in lg.handlers}


class InferenceSession:
    """A bundle's inference workflow, initialised once (network built, weights loaded), run per case.

    ``run(datalist)`` points the workflow's ``dataset`` at the images and runs its ``run`` expressions
    again (ConfigWorkflow evaluates them afresh each time, for streaming use); the outputs land in
    the ``output_dir`` override. After a failed case the workflow is rebuilt for the next one.
    Errors raise WorkflowError naming the innermost cause.

    Nothing global outlives the session: the bundle's code is imported under a private package
    name (``private_targets``), and sys.path and the loggers the workflow changes are put back
    (on ``close``).
    """

    def __init__(self, bundle: Path, config_files: list[str], quiet: bool = False, **overrides):
        self.bundle, self.config_files, self.quiet = bundle, config_files, quiet
        self.overrides = {"bundle_root": str(bundle), **overrides}
        self.workflow = None
        self.starts = (
            0  # workflows initialised (network built, weights loaded): 1 unless a case failed inside
        )
        self._logging: _LoggingKept | None = None

    def _start(self, datalist: list[str]) -> None:
        from monai.bundle import ConfigWorkflow

        logging_conf = self.bundle / "configs" / "logging.conf"
        if self._logging is None:
            self._logging = _LoggingKept(logging_conf)
        if self.quiet:  # MONAI's own logger announces the workflow at INFO
            logging.getLogger("monai.bundle.workflows").setLevel(logging.WARNING)
        configs = [str(self.bundle / "configs" / name) for name in self.config_files]
        workflow = ConfigWorkflow(
            config_file=configs if len(configs) > 1 else configs[0],
            meta_file=str(self.bundle / "configs" / "metadata.json"),
            logging_file=str(logging_conf),
            workflow_type=None,
            **{**private_targets(self.bundle, self.config_files), **self.overrides, "datalist": datalist},
        )
        if self.quiet:
            logging.getLogger().setLevel(logging.WARNING)
        with _sys_path_kept():
            workflow.initialize()
        self.workflow = workflow
        self.starts += 1

    def run(self, datalist: list[str], volumes: list | None = None) -> None:
        """Run the workflow on ``datalist`` (the images, in order).

        ``volumes``: the same images already read (MetaTensors (X, Y, Z) as MONAI's LoadImage
        returns them with the configs' readers), handed to the configs' loader where it takes them
        (``scripts.io.LoadVolumed``) so that no input is decoded twice; a bundle whose loader only
        reads paths (one made before it) reads the paths.
        """
        try:
            if self.workflow is None:
                self._start(datalist)
            parser = self.workflow.parser
            items = datalist
            if volumes is not None:
                loader = (getattr(parser.get_parsed_content("preprocessing"), "transforms", None) or [None])[
                    0
                ]
                items = volumes if getattr(loader, "takes_volumes", False) else datalist
            dataset = parser.get_parsed_content("dataset")
            dataset.data = [{"image": item} for item in items]
            reported = _ReportedByCaller()
            handlers = _all_handlers()
            for handler in handlers:
                handler.addFilter(reported)
            try:
                with _sys_path_kept():
                    self.workflow.run()
            finally:
                for handler in handlers:
                    handler.removeFilter(reported)
                dataset.data = []  # the volumes go with their case
            # let the last case's tensors go before the next case is loaded
            evaluator = parser.get_parsed_content("evaluator")
            evaluator.state.batch = evaluator.state.output = None
        except Exception as e:
            self.close()
            raise WorkflowError(error_summary(e)) from e

    def close(self) -> None:
        if self.workflow is not None:
            with contextlib.suppress(Exception), _sys_path_kept():
                self.workflow.finalize()
            self.workflow = None
        if self._logging is not None:
            self._logging.restore()
            self._logging = None

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_workflow(bundle: Path, config_files: list[str], quiet: bool = False, **overrides) -> None:
    """initialize / run / finalize a bundle workflow in this process (over its ``datalist``)."""
    datalist = overrides.pop("datalist")
    with InferenceSession(bundle, config_files, quiet=quiet, **overrides) as session:
        session.run(datalist)


def _override_args(overrides: dict) -> list[str]:
    """``--key value`` pairs as monai.bundle's fire parser reads them (Python literals: False, [1, 2])."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


def train_command(bundle: Path, **overrides) -> list[str]:
    """The ``python -m monai.bundle run`` command line that trains this bundle."""
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--bundle_root",
        str(bundle),
        "--config_file",
        str(bundle / "configs" / "train.json"),
        "--meta_file",
        str(bundle / "configs" / "metadata.json"),
        "--logging_file",
        str(bundle / "configs" / "logging.conf"),
        *_override_args(overrides),
    ]


def run_training(bundle: Path, **overrides) -> int:
    """Train in a child process; returns its exit code. Output streams to this terminal."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # the bundle must run on its own: no icmd_auto on the path is needed (or used)
    proc = subprocess.run(train_command(bundle, **overrides), env=env, cwd=str(bundle))
    return proc.returncode
