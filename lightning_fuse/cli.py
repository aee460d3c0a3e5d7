"""The ``lightning-fuse`` command: LightningCLI (fit / validate / test) plus ``export``."""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.cli import LightningCLI

from lightning_fuse.data import TextDataModule
from lightning_fuse.module import FusionModule


class FuseCLI(LightningCLI):
    """LightningCLI over ``FusionModule`` (or a subclass, via ``--model.class_path``) and a DataModule."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": "runs", "name": "fuse"}}})


def _export_main(argv: list[str]) -> None:
    from jsonargparse import auto_cli

    from lightning_fuse.export import export

    auto_cli(export, args=argv, as_positional=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-fuse``; ``argv`` defaults to the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args and args[0] == "export":
        _export_main(args[1:])
        return
    FuseCLI(FusionModule, TextDataModule, subclass_mode_model=True, subclass_mode_data=True, args=argv,
            save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
