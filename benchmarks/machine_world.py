"""A second benchmark world for ``benchmarks/quality.py --world machine``: 4 machine-text domains that are not the
demo's (C headers, man pages, Perl modules, npm's JavaScript), N = 6 sources of two sizes.

Built with the demo's own builder (``lightning_fuse.demo``: its corpus split, byte-level BPE tokenizer trained on
these domains, Llama specialists and untrained target), the domains registered here, not in the package:

- 4 specialists (``c_headers``, ``manpages``, ``perl``, ``javascript``), one per domain (d_model 64 with the fast
  build);
- ``weak``: the demo's weak source (a few steps on all four domains);
- ``general``: a larger generalist (1.5 x d_model, 3 layers), half a specialist's steps on all four domains.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lightning_fuse import demo


def _c_headers() -> list[Path]:
    return sorted(p for p in Path("/usr/include").rglob("*.h") if p.is_file())


def _manpages() -> list[Path]:
    return sorted(p for p in Path("/usr/share/man").glob("man[1-8]/*.gz") if p.is_file())


def _perl() -> list[Path]:
    roots = [Path("/usr/share/perl"), Path("/usr/share/perl5"), Path("/usr/lib/x86_64-linux-gnu/perl-base")]
    return demo._dedupe(sorted(p for r in roots if r.is_dir() for p in r.rglob("*.pm")))


def _javascript() -> list[Path]:
    root = Path("/usr/lib/node_modules")
    return sorted(p for p in root.rglob("*.js") if p.is_file() and ".min." not in p.name) if root.is_dir() else []


MACHINE_DOMAINS = {
    "c_headers": (_c_headers, "/usr/include/**/*.h"),
    "manpages": (_manpages, "/usr/share/man/man[1-8]/*.gz"),
    "perl": (_perl, "/usr/share/perl*/**/*.pm"),
    "javascript": (_javascript, "/usr/lib/node_modules/**/*.js"),
}
GENERAL = "general"


def register() -> None:
    """Make the demo builder know these domains (idempotent; the package itself is left unchanged on disk)."""
    for name, entry in MACHINE_DOMAINS.items():
        demo.DOMAINS.setdefault(name, entry)


def build(fast: bool) -> tuple[Path, list[dict[str, str]]]:
    """Build (or find) the world; return its root and its sources (``[{"name", "path"}]``)."""
    register()
    kwargs = {**(demo.FAST_BUILD if fast else {}), "domains": tuple(MACHINE_DOMAINS)}
    root = demo.build_demo_assets(**kwargs)
    settings = demo.DemoSettings(**kwargs)
    out = root / "extra" / GENERAL
    if not out.is_dir():
        tokenizer = demo._load_tokenizer(root / "tokenizer")
        tokens = {d: {split: demo._encode(tokenizer, (root / "corpus" / d / f"{split}.txt").read_text("utf-8"))
                      for split in ("train", "val")} for d in settings.domains}
        d_model = settings.d_model * 3 // 2 // settings.n_heads * settings.n_heads
        s = dataclasses.replace(settings, d_model=d_model, n_layers=settings.n_layers + 1,
                                weak_steps=settings.steps // 2, seed=settings.seed + 500)
        out.parent.mkdir(parents=True, exist_ok=True)
        with demo._atomic_dir(out.parent, out) as tmp:
            demo._build_source(demo.WEAK, 0, tokenizer, tokens, tmp, s)  # the builder's all-domains source
            meta = json.loads((tmp / demo.META_FILE).read_text())
            (tmp / demo.META_FILE).write_text(json.dumps({**meta, "name": GENERAL}, indent=2))
    sources = [{"name": n, "path": str(root / "sources" / n)} for n in settings.source_names]
    sources.append({"name": GENERAL, "path": str(out)})
    return root, sources


def describe(sources: list[dict[str, Any]]) -> list[str]:
    """One line per source: its size, steps and held-out loss per domain (from the build's metadata)."""
    lines = []
    for s in sources:
        meta = json.loads((Path(s["path"]) / demo.META_FILE).read_text())
        losses = ", ".join(f"{d} {v:.2f}" for d, v in meta["val_loss"].items())
        lines.append(f"- `{s['name']}`: {meta['n_params']['total']:,} params, {meta['steps']} steps; held-out loss {losses}")
    return lines
