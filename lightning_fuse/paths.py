"""Path schemes: one small registry that turns ``<scheme>://...`` paths into local folders.

The embedded demo registers ``demo://`` (:mod:`lightning_fuse.demo`, built on first use) and the packaged models
``pkg://`` (:mod:`lightning_fuse.pretrained`, converted on first use); the loaders (:mod:`lightning_fuse.sources`,
the data modules) only call :func:`resolve_path` and know neither. Register your own scheme with
``register_scheme("mine://", resolver)``: ``resolver(path)`` returns a local path.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

Resolver = Callable[[str], str]

_RESOLVERS: dict[str, Resolver] = {}
# schemes of the package itself, whose module registers them when imported (on first use: loading a model never
# imports the demo builder or the GGUF converter)
_BUILTIN = {"demo://": "lightning_fuse.demo", "pkg://": "lightning_fuse.pretrained"}


def register_scheme(prefix: str, resolver: Resolver) -> None:
    """Resolve paths starting with ``prefix`` (e.g. ``"demo://"``) with ``resolver(path) -> local path``."""
    if not prefix.endswith("://"):
        raise ValueError(f"a path scheme ends with '://', got {prefix!r}")
    _RESOLVERS[prefix] = resolver


def schemes() -> list[str]:
    """Every known scheme prefix (registered or built in)."""
    return sorted({*_RESOLVERS, *_BUILTIN})


def _resolver(prefix: str) -> Resolver | None:
    if prefix not in _RESOLVERS and prefix in _BUILTIN:
        importlib.import_module(_BUILTIN[prefix])  # registers itself
    return _RESOLVERS.get(prefix)


def resolve_path(path: str) -> str:
    """Expand a scheme path (``demo://``, ``pkg://``, registered ones) and ``~``; hub ids are returned unchanged."""
    if isinstance(path, str) and "://" in path:
        prefix = path[: path.index("://") + 3]
        resolver = _resolver(prefix)
        if resolver is not None:
            return resolver(path)
    expanded = os.path.expanduser(path)
    return expanded if os.path.exists(expanded) else path
