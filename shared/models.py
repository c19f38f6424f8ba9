"""Model families: one registry, one small interface, one module per family.

    FAMILIES = {"cgan": "shared.cgan", ...}     the `model` knob's values (shared/config.py)

A family module (`shared/<name>.py`) defines `FAMILY = Family(...)`: how to build its
named networks and everything the rest of fedsynth asks of it --

    client/train.py          `train_round` (None: the default DP trainer, a private
                             discriminator and a generator from noise that learns through it)
    client/app.py            `generator_mechanism` (does the generator read patient images,
                             i.e. is its update a DP mechanism of its own?), `data_problem`
    server (aggregation,     `build`: the networks are always {"generator", "discriminator"},
    checkpoints, release)    each any nn.Module, so weight packing (`shared/weights.py`:
                             prefixed keys in one ArrayRecord), FedAvg, the generator's EMA
                             and checkpoints need nothing family-specific
    server/release.py        `release`: "sampler" (generator(z, labels) -> images: sample
                             grids, synthetic images, DP evaluation) or "translator" (its own
                             `save_grid` and `write_images`)
    shared/config.py         `config_problem`: a one-line refusal of a config the family
                             cannot train (checked before any round)
    tests                    `private_networks`: what Opacus' validator must accept

Adding a family: one module with `FAMILY`, one line in `FAMILIES`. Modules are imported
when first asked for, so reading a config does not build any network.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from shared.config import RunConfig

FAMILIES = {
    "cgan": "shared.cgan",
    "cyclegan": "shared.cyclegan",
    "stylegan": "shared.stylegan",
}


def _no_problem(*_: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[["RunConfig"], dict[str, "nn.Module"]]
    # networks that read patient images and so are trained with per-sample DP
    private_networks: tuple[str, ...] = ("discriminator",)
    # True: the generator reads patient images, its update is a second DP mechanism
    generator_mechanism: bool = False
    release: str = "sampler"
    # flat config -> why the family cannot train it (one line), or None
    config_problem: Callable[[dict[str, Any]], str | None] = _no_problem
    # a hospital's labels (N,) and the class names -> why its data cannot be used, or None
    data_problem: Callable[["np.ndarray", tuple[str, ...]], str | None] = _no_problem
    # (nets, data, cfg, plan, seed, accountant_history) -> (RoundStats, history); None:
    # client/train.py's trainer for a generator from noise
    train_round: Callable[..., Any] | None = None
    # translator releases: (generator, cfg, path) and (generator, cfg, folder) -> dict
    save_grid: Callable[..., None] | None = None
    write_images: Callable[..., dict[str, Any]] | None = None


def family(model: "str | RunConfig") -> Family:
    """The Family of a model name or of a config's `model`."""
    name = model if isinstance(model, str) else model.model
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name]).FAMILY


def build(cfg: "RunConfig") -> dict[str, "nn.Module"]:
    """The named networks of the configured family, freshly initialised from cfg.seed."""
    import torch

    torch.manual_seed(cfg.seed)
    return family(cfg).build(cfg)
