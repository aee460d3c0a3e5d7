"""The ``lightning-fuse`` command: LightningCLI (fit / validate / test) plus ``export``."""

from __future__ import annotations

import contextlib
import logging
import sys
from unittest import mock

from lightning.pytorch.cli import LightningCLI

from lightning_fuse.data import TextDataModule
from lightning_fuse.module import FusionModule


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
                                                "init_args": {"save_dir": "runs", "name": "fuse"}},
                             # atomic, fsynced checkpoint writes; no NaN/inf checkpoint; one-line error for damaged ones
                             "trainer.plugins": [{"class_path": "lightning_fuse.checkpoint.AtomicCheckpointIO"}]})

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path``'s hyperparameters first: a damaged file gives a one-line error."""
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            from lightning_fuse.checkpoint import checkpoint_error

            raise checkpoint_error(self.config[self.config.subcommand].get("ckpt_path"), err) from None

    def before_fit(self) -> None:
        """``--ckpt_path last`` also finds the last checkpoint of an earlier run (each run gets a new logger version)."""
        from lightning_fuse.checkpoint import find_last_checkpoint

        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = find_last_checkpoint(self.trainer) or "last"


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

    from jsonargparse import ArgumentParser, auto_cli

    module_name, func = COMMANDS[name].split(":")
    fn = getattr(importlib.import_module(module_name), func)
    if "config" not in inspect.signature(fn).parameters:
        auto_cli(fn, args=argv, as_positional=False)
        return
    # auto_cli drops a parameter named `config` (jsonargparse reserves it for its own --config file)
    parser = ArgumentParser(prog=f"lightning-fuse {name}", description=inspect.getdoc(fn).split("\n\n")[0])
    parser.add_function_arguments(fn, as_group=False)
    cfg = parser.parse_args(argv)
    fn(**parser.instantiate(cfg))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-fuse``; ``argv`` defaults to the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args and args[0] in COMMANDS:
        _run_command(args[0], args[1:])
        return
    # Called from Python with explicit args (a notebook, a test): the host's own sys.argv is not ours, and
    # LightningCLI would warn that it sees both.
    with contextlib.nullcontext() if argv is None else mock.patch.object(sys, "argv", sys.argv[:1]):
        FuseCLI(FusionModule, TextDataModule, subclass_mode_model=True, subclass_mode_data=True, args=argv,
                save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
