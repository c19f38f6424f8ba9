"""The fast DP discriminator step computes exactly the mechanism the privacy argument is about.

client/train.py clips only what is private: the real images' per-sample gradients go
through Opacus (ghost clipping with client/ghost_clipping.py's Conv2d norms at 64x64,
per-sample hooks at 28x28), the B generated images' gradient is summed, clipped as a
whole to B*C and added after the noise. Both real-image paths are tested here.
Each test compares against a reference that does not share the code under test:

* per-sample gradients by plain autograd, one image at a time (GroupNorm and the
  projection are per sample, so a batch of one gives exactly sample i's gradient);
* Opacus' stock per-sample hooks (`grad_sample_mode="hooks"`), the path the previous
  implementation used, on the same batch and with the same noise seed.

And the accountant sees the plan's (noise multiplier, sample rate, steps), whichever path
clips, including steps whose Poisson batch is empty.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import smoke_config
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client import ghost_clipping
from client import train as dp_train
from client.data import HospitalData
from shared.cgan import Discriminator, Generator

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 2


def _images(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    return images, torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _discriminator(size: int, width: int = 8, seed: int = 0) -> Discriminator:
    torch.manual_seed(seed)
    d = Discriminator(size, NUM_CLASSES, width)
    # DCGAN init gives tiny, nearly equal gradients; spread the weights so that some
    # samples are clipped and some are not.
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return d


def _per_sample_grads(d: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      target: float) -> torch.Tensor:
    """(N, P) flattened gradients of each sample's BCE loss, one autograd call per image."""
    params = [p for p in d.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        logit = d(x[i:i + 1], y[i:i + 1])
        loss = F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, target),
                                                  reduction="sum")
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _clipped_sum(per_sample: torch.Tensor, clip: float) -> torch.Tensor:
    norms = per_sample.norm(dim=1, keepdim=True)
    return (per_sample * (clip / (norms + 1e-6)).clamp(max=1.0)).sum(0)


def _flat_grad(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad])


def _make_private(d: nn.Module, mode: str, clip: float, sigma: float = 0.0, seed: int = 0,
                  n: int = 64, batch: int = 16):
    """client.train.make_private over a dummy data set of n images, expected batch `batch`."""
    loader = DataLoader(TensorDataset(torch.zeros(n)), batch_size=batch)  # its length: q
    plan = dp_train.DPPlan(noise_multiplier=sigma, sample_rate=batch / n, steps=1,
                           max_grad_norm=clip, dataset_size=n)
    engine = PrivacyEngine(accountant="rdp")
    optimizer = torch.optim.Adam(d.parameters(), lr=1e-3)
    private_d, opt_d, real_loss, _ = dp_train.make_private(
        engine, d, optimizer, loader, plan, torch.Generator().manual_seed(seed), mode)
    return engine, private_d, opt_d, real_loss


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 equality for summed gradients: elementwise, relative to the largest entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-4,
                               atol=1e-5 * expected.abs().max().item())


def _median_norm(d: nn.Module, x, y) -> float:
    return _per_sample_grads(d, x, y, 1.0).norm(dim=1).median().item()


# --------------------------------------------------------------------- Conv2d ghost norms

@pytest.mark.parametrize("conv", [
    dict(in_channels=1, out_channels=8, kernel_size=4, stride=2, padding=1),
    dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1),
    dict(in_channels=6, out_channels=5, kernel_size=(3, 2), stride=1, padding=(1, 0), bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=1, padding=2, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2),        # falls back to Opacus
])
@pytest.mark.parametrize("formula", ["ghost", "materialised"])
def test_conv_norms_match_per_sample_gradients(conv, formula, monkeypatch):
    torch.manual_seed(0)
    layer = nn.Conv2d(**conv)
    x = torch.randn(5, conv["in_channels"], 9, 8)
    out = layer(x)
    upstream = torch.randn_like(out)
    monkeypatch.setattr(ghost_clipping, "use_ghost_norm", lambda *a: formula == "ghost")
    norms = ghost_clipping.conv2d_norm_sample(layer, [x], upstream)
    for i in range(len(x)):
        grads = torch.autograd.grad((layer(x[i:i + 1]) * upstream[i:i + 1]).sum(),
                                    list(layer.parameters()))
        for p, g in zip(layer.parameters(), grads):
            assert norms[p][i].item() == pytest.approx(g.norm().item(), rel=1e-5, abs=1e-7)


def test_conv_norms_accept_an_empty_batch():
    layer = nn.Conv2d(2, 3, 3)
    norms = ghost_clipping.conv2d_norm_sample(layer, [torch.zeros(0, 2, 6, 6)],
                                              torch.zeros(0, 3, 4, 4))
    assert all(v.shape == (0,) for v in norms.values())


# --------------------------------------------------------------------- the real term alone

@pytest.mark.parametrize("size", [28, 64])
def test_real_term_equals_opacus_per_sample_clipping(size):
    """Noise off: Opacus' clipped sum over the real batch, ghost path vs stock hooks vs autograd."""
    real, labels = _images(12, size, seed=1)
    d0 = _discriminator(size)
    clip = _median_norm(d0, real, labels)           # about half the samples are clipped
    expected = _clipped_sum(_per_sample_grads(d0, real, labels, 1.0), clip)

    summed = {}
    for mode in ("ghost", "hooks"):
        _, private_d, opt_d, real_loss = _make_private(copy.deepcopy(d0), mode, clip)
        opt_d.zero_grad(set_to_none=True)
        logits = private_d(real, labels)
        if real_loss is None:
            loss = F.binary_cross_entropy_with_logits(logits, torch.ones(len(real)),
                                                      reduction="sum")
            loss.backward()
        else:
            real_loss(logits, torch.ones(len(real))).backward()
        assert opt_d.pre_step()
        summed[mode] = _flat_grad(private_d)       # sigma = 0: the clipped sum itself
    _assert_close(summed["hooks"], expected)
    _assert_close(summed["ghost"], expected)
    _assert_close(summed["ghost"], summed["hooks"])


# --------------------------------------------------------------------- the whole step

def _step_gradient(d0, mode, clip, sigma, real, labels, fake, y_fake, B, seed=0):
    engine, private_d, opt_d, real_loss = _make_private(copy.deepcopy(d0), mode, clip, sigma, seed)
    _, stepped = dp_train.discriminator_gradient(private_d, opt_d, real_loss, real, labels,
                                                 fake, y_fake, B, clip)
    assert stepped
    return _flat_grad(private_d), engine.accountant.history


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
@pytest.mark.parametrize("fake_clipped", [True, False])
def test_step_gradient_equals_manual_computation(mode, fake_clipped):
    """Noise off: g = (sum_i clip_C(real grad_i) + clip_BC(sum_j fake grad_j)) / B."""
    B = 8
    real, labels = _images(11, 28, seed=2)            # a Poisson batch: |S| != B
    fake, y_fake = _images(B, 28, seed=3)
    d0 = _discriminator(28)
    clip = _median_norm(d0, real, labels)
    fake_sum = _per_sample_grads(d0, fake, y_fake, 0.0).sum(0)
    if fake_clipped:                                  # B*C below |fake sum|
        clip = min(clip, fake_sum.norm().item() / (2 * B))
    else:                                             # B*C above it
        clip = max(clip, 2 * fake_sum.norm().item() / B)
    real_part = _clipped_sum(_per_sample_grads(d0, real, labels, 1.0), clip)
    fake_part = fake_sum * min(1.0, B * clip / fake_sum.norm().item())
    assert (fake_part.norm() < fake_sum.norm() - 1e-6) == fake_clipped
    expected = (real_part + fake_part) / B

    got, history = _step_gradient(d0, mode, clip, 0.0, real, labels, fake, y_fake, B)
    _assert_close(got, expected)
    assert history == [(0.0, 0.25, 1)]


def test_noised_step_equals_opacus_hooks_with_the_same_seed():
    """Noise on: the ghost path's clipped, noised gradient is the stock hooks path's."""
    B = 8
    real, labels = _images(10, 28, seed=4)
    fake, y_fake = _images(B, 28, seed=5)
    d0 = _discriminator(28)
    clip = _median_norm(d0, real, labels)
    ghost, h_ghost = _step_gradient(d0, "ghost", clip, 1.3, real, labels, fake, y_fake, B, seed=7)
    hooks, h_hooks = _step_gradient(d0, "hooks", clip, 1.3, real, labels, fake, y_fake, B, seed=7)
    noiseless, _ = _step_gradient(d0, "hooks", clip, 0.0, real, labels, fake, y_fake, B)
    _assert_close(ghost, hooks)
    # and the noise is there: sigma*C/B per coordinate
    noise_std = (ghost - noiseless).std().item()
    assert noise_std == pytest.approx(1.3 * clip / B, rel=0.1)
    assert h_ghost == h_hooks == [(1.3, 0.25, 1)]


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_poisson_batch_is_noise_plus_the_generated_term(mode):
    B = 4
    fake, y_fake = _images(B, 28, seed=6)
    empty_x, empty_y = _images(0, 28, seed=6)
    d0 = _discriminator(28)
    clip = 0.5
    fake_sum = _per_sample_grads(d0, fake, y_fake, 0.0).sum(0)
    fake_part = fake_sum * min(1.0, B * clip / fake_sum.norm().item())
    got, history = _step_gradient(d0, mode, clip, 0.0, empty_x, empty_y, fake, y_fake, B)
    _assert_close(got, fake_part / B)
    assert history == [(0.0, 0.25, 1)]
    noised, history = _step_gradient(d0, mode, clip, 2.0, empty_x, empty_y, fake, y_fake, B)
    assert (noised - got).std().item() == pytest.approx(2.0 * clip / B, rel=0.1)
    assert history == [(2.0, 0.25, 1)]


# --------------------------------------------------------------------- the accountant's inputs

def _round(cfg, data, plan, mode, history=None):
    torch.manual_seed(cfg.seed)
    g = Generator(cfg.image_size, cfg.num_classes, cfg.latent_dim, cfg.g_width)
    d = Discriminator(cfg.image_size, cfg.num_classes, cfg.d_width)
    stats, hist = dp_train.train_round(g, d, data, cfg, plan, seed=11, accountant_history=history,
                                       mode=mode)
    return stats, hist, d


def test_accountant_inputs_are_the_plans_whichever_path_clips(tmp_path):
    """Sample rate, noise multiplier and steps reach the accountant unchanged by ghost
    clipping; the two paths train to the same discriminator (same draws, same noise)."""
    cfg = smoke_config(tmp_path, batch_size=16, local_d_steps=6)
    x, y = _images(80, 28, seed=8)
    data = HospitalData(images=x, labels=y)
    plan = dp_train.DPPlan(noise_multiplier=1.7, sample_rate=dp_train.sample_rate(cfg, 80),
                           steps=6, max_grad_norm=cfg.max_grad_norm, dataset_size=80)
    assert plan.sample_rate == 1 / math.ceil(80 / 16) == 0.2
    before = [(0.9, 0.1, 3)]
    results = {mode: _round(cfg, data, plan, mode, before) for mode in ("ghost", "hooks")}
    for stats, hist, _ in results.values():
        assert hist == before + [(1.7, 0.2, 6)]
        assert stats.d_steps == 6 and stats.g_steps == 3
    d_ghost, d_hooks = results["ghost"][2], results["hooks"][2]
    for (name, a), b in zip(d_ghost.state_dict().items(), d_hooks.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_rounds_with_empty_poisson_batches_still_count_every_step(tmp_path):
    """n = 3, batch-size 1: q = 1/3, a third of the batches are empty; every step counts."""
    cfg = smoke_config(tmp_path, batch_size=1, local_d_steps=12)
    x, y = _images(3, 28, seed=9)
    plan = dp_train.DPPlan(noise_multiplier=1.0, sample_rate=dp_train.sample_rate(cfg, 3),
                           steps=12, max_grad_norm=1.0, dataset_size=3)
    _, hist, d = _round(cfg, HospitalData(images=x, labels=y), plan, "ghost")
    assert hist == [(1.0, 1 / 3, 12)]
    assert all(torch.isfinite(v).all() for v in d.state_dict().values())


def test_the_clipping_path_is_chosen_by_image_size(tmp_path):
    """benchmarks/RESULTS.md: hooks are faster at 28x28, ghost clipping at 64x64."""
    assert dp_train.grad_sample_mode(smoke_config(tmp_path, image_size=28)) == "hooks"
    assert dp_train.grad_sample_mode(smoke_config(tmp_path, image_size=64)) == "ghost"
