"""Who taught each token on held-out mixed-domain blocks: per-sequence vs per-token fusion, one PNG.

Usage: python benchmarks/token_picture.py [--fast_assets] [--steps 120]

Fits two targets as ``benchmarks/quality.py --mixed`` does (same assets, offline cache, regime and seed 0):
``adaptive k2 b0`` (per sequence) and ``token adaptive k3`` (per token), then draws the same held-out mixed blocks
with each token coloured by the source that taught it (``lightning_fuse.token_picture``), the true segment domains
above them. Needs the cache that ``quality.py --mixed`` builds (run it first, with the same flags).
Writes benchmarks/results/token_picture.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast_assets", action="store_true")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--max_blocks_per_domain", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=2, help="held-out mixed blocks drawn")
    parser.add_argument("--out", type=Path, default=quality.RESULTS / "token_picture.png")
    args = parser.parse_args(argv)

    import lightning.pytorch as pl
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import default_collate

    from lightning_fuse.token_picture import TaughtText, figure_rgb, plot_token_sources, taught_rows

    torch.set_num_threads(1)
    regime = dataclasses.replace(quality.Regime(), steps=args.steps, max_blocks_per_domain=args.max_blocks_per_domain,
                                 seeds=(0,), **quality.MIXED_FULL)
    with contextlib.redirect_stdout(io.StringIO()):
        assets = quality.prepare(args.fast_assets, regime)
    images = []
    for method in ("adaptive k2 b0", "token adaptive k3"):
        module_kwargs, feedback = quality.ALL_METHODS[method]
        job = {"method": method, "seed": 0, "module": module_kwargs, "feedback": feedback,
               "regime": dataclasses.asdict(regime), "root": assets["root"], "sources": assets["sources"],
               "data": assets["data"], "cache_dir": assets["cache_dir"]}
        module, dm = fit(job, pl)
        base = dm.val_set.base
        rows = (base.domains == len(dm.pure_domains)).nonzero().squeeze(-1).tolist()[: args.blocks]
        batch = default_collate(dm.val_set.__getitems__(rows))
        module.eval()
        texts = taught_rows(module, batch, rows=len(rows))
        truth = []
        for b, text in enumerate(texts):  # the true domain of every token, as a "teacher" row (oracle colours)
            seg = batch["segments"][b].tolist()
            teacher = [module.source_names.index(dm.pure_domains[d]) for d in seg]
            truth.append(TaughtText(text.tokens, teacher, [1.0] * len(seg), f"block {b + 1}: true domain of each token"))
            text.title = f"block {b + 1}: taught by ({method})"
        fig = plot_token_sources([x for pair in zip(truth, texts) for x in pair], module.source_names, 110,
                                 title=f"{method}: who taught each token (darker = larger weight), seed 0, "
                                       f"{regime.steps} steps")
        images.append(figure_rgb(fig))
    width = max(im.shape[1] for im in images)
    padded = [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255) for im in images]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(padded, axis=0)).save(args.out)
    print(f"wrote {args.out}")
    return 0


def fit(job, pl):
    """One fit as ``quality.run_one`` does it; returns the module and the data module."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning_fuse"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from mixed_blocks import MixedCachedDataModule

    from lightning_fuse import SelectionFeedback

    r = quality.Regime(**job["regime"])
    pl.seed_everything(job["seed"], verbose=False)
    module = quality._module_class()(
        init_seed=job["seed"], target=str(Path(job["root"]) / "target"), sources=job["sources"], offline=True,
        **{"selector_features": "rewards", "clm_weight": r.clm_weight, "learning_rate": r.learning_rate,
           "selector_learning_rate": r.selector_learning_rate, "warmup_steps": r.warmup_steps,
           "distill_top_k": r.distill_top_k, **job["module"]},
    )
    dm = MixedCachedDataModule(**job["data"], cache_dir=job["cache_dir"], seed=job["seed"], verify=False)
    callbacks = [SelectionFeedback(**job["feedback"])] if job["feedback"] is not None else []
    trainer = pl.Trainer(max_steps=r.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, dm)
    return module, dm


if __name__ == "__main__":
    sys.exit(main())
