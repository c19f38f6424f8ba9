"""The release's sampler: best-of-r selection by the final discriminator (release-candidates)
and the cGAN's initialisation knob (init)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fake_grid import FakeGrid, node_config, run_config
from server import federation, release
from shared import models, weights
from shared.config import ConfigError, RunConfig, validate


class ConstantFromLatent(nn.Module):
    """Image = its latent's first coordinate everywhere (so a draw is identifiable)."""

    def forward(self, z, labels):
        return z[:, :1, None, None].expand(-1, 1, 4, 4).tanh()


class Brightness(nn.Module):
    """Critic: mean brightness, plus a large bonus for label 1 images that are dark."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images, labels):
        self.seen.append(labels.clone())
        mean = images.flatten(1).mean(1)
        return torch.where(labels == 1, -mean, mean)


def test_best_of_keeps_the_candidate_the_critic_prefers_for_its_own_label():
    critic = Brightness()
    best = release.BestOf(ConstantFromLatent(), critic, candidates=3)
    labels = torch.tensor([0, 1, 0, 1])
    z = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    out = best(z, labels)
    assert out.shape == (4, 1, 4, 4)
    draws = z[:, 0].tanh().view(4, 3)
    expect = torch.where(labels == 0, draws.max(1).values, draws.min(1).values)
    assert torch.allclose(out[:, 0, 0, 0], expect)
    # each candidate was scored with the label it was generated for
    assert torch.equal(critic.seen[0], labels.repeat_interleave(3))


def test_one_candidate_draws_exactly_the_plain_samples():
    cfg = RunConfig.from_flat(validate({}))
    nets = models.build(cfg)
    labels = np.repeat(np.arange(cfg.num_classes), 7)
    plain = release.generate(nets["generator"].eval(), labels, cfg.latent_dim, seed=5)
    wrapped = release.BestOf(nets["generator"], nets["discriminator"].eval(), 1)
    assert np.array_equal(release.generate(wrapped, labels, cfg.latent_dim, seed=5), plain)


def test_more_candidates_change_the_images_and_stay_reproducible():
    cfg = RunConfig.from_flat(validate({"release-candidates": 4}))
    arrays = weights.to_numpy(models.build(cfg))
    sampler = release.generator_from(cfg, arrays)
    assert isinstance(sampler, release.BestOf)
    labels = np.repeat(np.arange(cfg.num_classes), 5)
    a = release.generate(sampler, labels, cfg.latent_dim, seed=3)
    b = release.generate(release.generator_from(cfg, arrays), labels, cfg.latent_dim, seed=3)
    plain = release.generate(sampler.generator, labels, cfg.latent_dim, seed=3)
    assert np.array_equal(a, b)
    assert a.shape == plain.shape and not np.array_equal(a, plain)


def test_candidates_without_the_discriminator_are_refused():
    cfg = RunConfig.from_flat(validate({"release-candidates": 2}))
    generator_only = {k: v for k, v in weights.to_numpy(models.build(cfg)).items()
                      if k.startswith("generator.")}
    with pytest.raises(ValueError, match="needs the discriminator"):
        release.generator_from(cfg, generator_only)


@pytest.mark.parametrize("values, problem", [
    ({"release-candidates": 0}, "release-candidates = 0: must be >= 1"),
    ({"model": "cyclegan", "release-candidates": 2}, "translates given images"),
    ({"init": "xavier"}, "init = 'xavier': must be dcgan or pytorch"),
    ({"model": "stylegan", "image-size": 32, "init": "pytorch"}, "is a cgan knob"),
])
def test_bad_selection_or_init_is_refused(values, problem):
    with pytest.raises(ConfigError, match=problem):
        validate(values)


def test_pytorch_init_starts_the_generator_away_from_flat_grey():
    spread = {}
    for init in ("dcgan", "pytorch"):
        cfg = RunConfig.from_flat(validate({"init": init}))
        g = models.build(cfg)["generator"].eval()
        with torch.no_grad():
            x = g(torch.randn(16, cfg.latent_dim), torch.zeros(16, dtype=torch.long))
        spread[init] = x.std().item()
    assert spread["pytorch"] > 5 * spread["dcgan"]


def test_a_release_with_candidates_states_them_and_ships_the_critic(tmp_path):
    rc = run_config(tmp_path / "out", num_rounds=1, num_hospitals=1, release_candidates=3,
                    samples_per_class=4)
    nodes = {1: node_config(tmp_path, "hospital-a", 100.0, (0, 64))}
    with FakeGrid(rc, nodes) as grid:
        out = federation.run(grid, RunConfig.from_flat(rc))
    meta = json.loads((out / "release.json").read_text())
    assert meta["images"]["selection"]["candidates"] == 3
    critic = torch.load(out / "discriminator.pt")
    cfg = RunConfig.from_flat(rc)
    # the shipped files reproduce the released images
    arrays = {f"generator.{k}": v.numpy() for k, v in torch.load(out / "generator-ema.pt").items()}
    arrays.update({f"discriminator.{k}": v.numpy() for k, v in critic.items()})
    labels = np.repeat(np.arange(cfg.num_classes), cfg.samples_per_class)
    again = release.generate(release.generator_from(cfg, arrays), labels, cfg.latent_dim,
                             meta["seeds"]["release_samples"])
    with np.load(out / "synthetic.npz") as npz:
        assert np.array_equal(npz["train_images"], again)
