"""The ``lightning-fuse`` command: LightningCLI (fit / validate / test) plus ``export``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from unittest import mock

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_fuse.data import TextDataModule
from lightning_fuse.errors import VERBOSE_ENV, condense_usage_error, error_line, verbose_requested
from lightning_fuse.module import FusionModule

log = logging.getLogger(__name__)


class FuseArgumentParser(LightningArgumentParser):
    """A usage error prints one usage line, not every option (``--help`` lists them)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("prog", "lightning-fuse")
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        return super().error(condense_usage_error(message), ex)

    def print_usage(self, file=None) -> None:
        print(f"usage: {self.prog.replace(' [options]', '')} [options] (--help lists them)", file=file or sys.stderr)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_noise() -> None:
    """Drop what every run would print but no user needs: a dependency's deprecation warning, Lightning's logger
    tip, and transformers' per-model "Loading weights" bars (each source still logs one line when it loads)."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) for f in target.filters):
            target.addFilter(_DropPrefix("💡 Tip"))
    hf_logging.disable_progress_bar()


class FuseCLI(LightningCLI):
    """LightningCLI over ``FusionModule`` (or a subclass, via ``--model.class_path``) and a DataModule."""

    def before_instantiate_classes(self) -> None:
        _apply_threads(self)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--num_threads", type=int | None, default=None,
            help="torch intra-op CPU threads (None: torch's default). Tiny models on a busy CPU run faster on 1.",
        )
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": "runs", "name": "fuse",
                                                              "default_hp_metric": False}},  # no empty hp_metric card
                             # atomic, fsynced checkpoint writes; no NaN/inf checkpoint; one-line error for damaged ones
                             "trainer.plugins": [{"class_path": "lightning_fuse.checkpoint.AtomicCheckpointIO"}]})

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would replace the ``model:`` section by the checkpoint's saved hyperparameters, silently
        ignoring the user's config and overrides. Here the user's config wins: ``FusionModule.on_load_checkpoint``
        refuses the settings that cannot change on resume and logs those that changed."""


    def before_fit(self) -> None:
        """Remove temporary files of interrupted checkpoint writes; ``--ckpt_path last`` = the newest complete
        checkpoint of the run, also of an earlier process (each gets a new logger version), whichever file holds it."""
        from lightning_fuse.checkpoint import checkpoint_folders, newest_checkpoint, remove_stale_temporaries

        folders = checkpoint_folders(self.trainer)
        remove_stale_temporaries(folders)
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            found = newest_checkpoint(folders)
            if found is None:
                log.info("--ckpt_path last: no checkpoint found under %s: starting from scratch",
                         self.trainer.default_root_dir)
            config["ckpt_path"] = found


# Subcommands besides LightningCLI's fit/validate/test/predict: name -> "module:function". Each function's typed
# signature is its command line (jsonargparse), its docstring's ``Args:`` the ``--help``.
COMMANDS = {
    "export": "lightning_fuse.export:export",
    "merge": "lightning_fuse.merge:merge_models",
    "precompute": "lightning_fuse.precompute:precompute",
    "generate": "lightning_fuse.generate:generate",
    "evaluate": "lightning_fuse.evaluation:evaluate",
    "align-report": "lightning_fuse.align_report:align_report",
}


def _apply_threads(cli: LightningCLI) -> None:
    config = cli.config.get(cli.subcommand, cli.config) if cli.subcommand else cli.config
    threads = config.get("num_threads")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_command(name: str, argv: list[str]) -> None:
    import importlib
    import inspect

    from jsonargparse import auto_cli

    module_name, func = COMMANDS[name].split(":")
    fn = getattr(importlib.import_module(module_name), func)
    if "config" not in inspect.signature(fn).parameters:
        auto_cli(fn, args=argv, as_positional=False, parser_class=FuseArgumentParser)
        return
    # auto_cli drops a parameter named `config` (jsonargparse reserves it for its own --config file): here it is
    # the fit YAML, given once or several times (composed in order, as `lightning-fuse fit --config a --config b`)
    parser = FuseArgumentParser(prog=f"lightning-fuse {name}", description=inspect.getdoc(fn).split("\n\n")[0])
    parser.add_function_arguments(fn, as_group=False, skip={"config"})
    required = inspect.signature(fn).parameters["config"].default is inspect.Parameter.empty
    parser.add_argument("--config", "-c", action="append", required=required, metavar="CONFIG",
                        help="the YAML given to `lightning-fuse fit`; repeat to compose several, later ones win.")
    cfg = parser.parse_args(argv)
    kwargs = parser.instantiate(cfg)
    kwargs = {k: v for k, v in dict(kwargs).items() if not k.startswith("__")}
    fn(**kwargs)


def main(argv: list[str] | None = None, exit_on_error: bool | None = None) -> None:
    """Entry point of ``lightning-fuse``; ``argv`` defaults to the command line.

    Errors end the command with one line ``error: <cause>. <fix>`` on stderr and exit code 1 (2 for usage errors);
    ``--verbose`` (anywhere on the command line) or ``LIGHTNING_FUSE_VERBOSE=1`` shows the traceback instead.
    ``exit_on_error`` defaults to True for the command line and False when called with ``argv`` (the exception
    propagates to the caller).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or verbose_requested()
    args = [a for a in args if a != "--verbose"]
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # processes launched by the strategy (DDP) rerun the command without the flag
    if exit_on_error is None:
        exit_on_error = argv is None
    try:
        _main(args, from_command_line=argv is None)
    except KeyboardInterrupt:
        if verbose or not exit_on_error:
            raise
        print("error: interrupted. Resume a fit with --ckpt_path last.", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if verbose or not exit_on_error:
            raise
        print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
        sys.exit(1)


def _main(args: list[str], from_command_line: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_noise()
    if args and args[0] in COMMANDS:
        _run_command(args[0], args[1:])
        return
    if from_command_line:  # LightningCLI reads sys.argv (DDP relaunches the script with it): without --verbose
        sys.argv[1:] = args
        cli_args, argv_patch = None, contextlib.nullcontext()
    else:  # from Python with explicit args: the host's own sys.argv is not ours (LightningCLI would warn)
        cli_args, argv_patch = args, mock.patch.object(sys, "argv", sys.argv[:1])
    with argv_patch:
        FuseCLI(FusionModule, TextDataModule, subclass_mode_model=True, subclass_mode_data=True, args=cli_args,
                save_config_kwargs={"overwrite": True}, parser_class=FuseArgumentParser)


if __name__ == "__main__":
    main()
