"""The model families (shared/models.py): every private network is per-sample DP-trainable,
the StyleGAN discriminator ignores the rest of the batch, the CycleGAN's per-image gradients
are exact and its generator mechanism is charged, and the loss and DiffAugment knobs keep
each image's term its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import smoke_config, smoke_values
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator
from torch import nn

from client import app as client_app
from client.data import HospitalData
from client.train import DPPlan, calibrate_noise, generator_private_steps, sample_rate, train_round
from shared import cyclegan, losses, models, stylegan, weights
from shared.config import RunConfig, validate
from shared.diffaugment import DiffAugment

NODE = {"partition-id": 0, "num-partitions": 2}
TINY = {"g-width": 4, "d-width": 4, "latent-dim": 8}


def _cfg(model: str, size: int, **extra) -> RunConfig:
    return RunConfig.from_flat(validate({"model": model, "image-size": size, **TINY,
                                         **{k.replace("_", "-"): v for k, v in extra.items()}}))


FAMILY_SIZES = [("cgan", 28), ("cgan", 32), ("cgan", 64), ("stylegan", 32), ("stylegan", 64),
                ("cyclegan", 28), ("cyclegan", 64)]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- every family

def test_the_registry_names_every_family_and_the_model_knob_accepts_exactly_them():
    assert set(models.FAMILIES) == {"cgan", "cyclegan", "stylegan"}
    for name in models.FAMILIES:
        assert models.family(name).name == name
    with pytest.raises(KeyError, match="unknown model family 'gan'"):
        models.family("gan")


@pytest.mark.parametrize("model, size", FAMILY_SIZES, ids=lambda v: str(v))
def test_private_networks_pass_opacus_strict_validation(model, size):
    cfg = _cfg(model, size)
    nets = models.build(cfg)
    family = models.family(cfg)
    assert set(nets) == {"generator", "discriminator"}
    assert "discriminator" in family.private_networks
    assert ("generator" in family.private_networks) == family.generator_mechanism
    for name in family.private_networks:
        ModuleValidator.validate(nets[name], strict=True)   # raises on cross-sample layers
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                       for m in nets[name].modules()), name


@pytest.mark.parametrize("model, size", FAMILY_SIZES, ids=lambda v: str(v))
def test_every_family_round_trips_through_one_arrayrecord(model, size):
    cfg = _cfg(model, size)
    source, target = models.build(cfg), models.build(RunConfig.from_flat({**cfg.to_flat(), "seed": 5}))
    weights.unpack(weights.pack(source), target)
    assert weights.digest(weights.to_numpy(source)) == weights.digest(weights.to_numpy(target))


# --------------------------------------------------------------------------- StyleGAN

@pytest.mark.parametrize("size", [32, 64])
def test_stylegan_discriminator_output_for_one_image_ignores_the_rest_of_the_batch(size):
    # Property: for random batches and random replacements of every other image (and
    # label), image 0's logit stays the same. StyleGAN's minibatch-std layer would break it.
    d = models.build(_cfg("stylegan", size))["discriminator"]
    rng = torch.Generator().manual_seed(1)
    for trial in range(8):
        n = int(torch.randint(2, 7, (1,), generator=rng))
        images = torch.rand(n, 1, size, size, generator=rng) * 2 - 1
        labels = torch.randint(0, 2, (n,), generator=rng)
        others = images.clone()
        others[1:] = torch.randn(n - 1, 1, size, size, generator=rng) * (trial + 1)
        other_labels = labels.clone()
        other_labels[1:] = 1 - labels[1:]
        with torch.no_grad():
            first, second = d(images, labels)[0], d(others, other_labels)[0]
            alone = d(images[:1], labels[:1])[0]
        torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(first, alone, rtol=1e-5, atol=1e-6)


def test_the_batch_independence_check_catches_a_minibatch_std_layer():
    # the property above can fail: the minibatch std that StyleGAN uses moves image 0's value
    def minibatch_std(h):
        return torch.cat([h, h.std(dim=0).mean().expand(h.shape[0], 1, *h.shape[2:])], 1)

    h = torch.rand(4, 3, 4, 4)
    changed = h.clone()
    changed[1:] *= 3
    assert not torch.allclose(minibatch_std(h)[0], minibatch_std(changed)[0])
    torch.testing.assert_close(stylegan.per_image_spread(h)[0],
                               stylegan.per_image_spread(changed)[0])


@pytest.mark.parametrize("size", [32, 64])
def test_stylegan_generator_maps_labels_and_noise_to_images_in_range(size):
    cfg = _cfg("stylegan", size)
    g = models.build(cfg)["generator"]
    names = [n for n, _ in g.named_modules()]
    assert "mapping" in names and any("noise" in n for n, _ in g.named_parameters())
    z, y = torch.randn(4, cfg.latent_dim), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        for layer in g.layers:                      # let the noise inputs act
            layer.noise_strength.fill_(0.5)
        train_a, train_b = g.train()(z, y), g(z, y)
        eval_a, eval_b = g.eval()(z, y), g(z, y)
        other_class = g(z, 1 - y)
    assert train_a.shape == (4, 1, size, size)
    assert train_a.min() >= -1 and train_a.max() <= 1
    assert not torch.equal(train_a, train_b)        # fresh per-layer noise while training
    assert torch.equal(eval_a, eval_b)              # fixed noise: a release regenerates
    assert not torch.allclose(eval_a, other_class)  # the class reaches the image


def test_stylegan_is_refused_at_a_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        validate({"model": "stylegan", "image-size": 28})


# --------------------------------------------------------------------------- losses, DiffAugment

def test_losses_are_the_textbook_formulas_per_image():
    x = torch.tensor([-2.0, 0.0, 3.0])
    softplus = torch.nn.functional.softplus
    torch.testing.assert_close(losses.d_real(x, "non-saturating"), softplus(-x))
    torch.testing.assert_close(losses.d_fake(x, "non-saturating"), softplus(x))
    torch.testing.assert_close(losses.g_adversarial(x, "non-saturating"), softplus(-x))
    torch.testing.assert_close(losses.d_real(x, "hinge"), torch.tensor([3.0, 1.0, 0.0]))
    torch.testing.assert_close(losses.d_fake(x, "hinge"), torch.tensor([0.0, 1.0, 4.0]))
    torch.testing.assert_close(losses.g_adversarial(x, "hinge"), -x)
    criterion = losses.RealImageCriterion("hinge")
    criterion.reduction = "none"
    torch.testing.assert_close(criterion(x, None), torch.tensor([3.0, 1.0, 0.0]))


def test_diffaugment_is_per_image_differentiable_and_runs_under_vmap():
    aug = DiffAugment("color,translation,cutout")
    x = _images(5, 16).requires_grad_(True)
    params = aug.draw(5, 16, torch.Generator().manual_seed(0))
    out = aug(x, params)
    assert out.shape == x.shape and not torch.equal(out, x)
    changed = x.detach().clone()
    changed[1:] = 0.3
    torch.testing.assert_close(aug(changed, params)[0], out[0].detach())
    out.sum().backward()                                  # the generator learns through it
    assert x.grad is not None and x.grad.abs().sum() > 0
    from shared.diffaugment import AugmentParams
    mapped = torch.func.vmap(lambda xi, pi: aug(xi[None], AugmentParams.of(pi[None]))[0])(
        x.detach(), params.stacked())
    torch.testing.assert_close(mapped, out.detach())
    assert DiffAugment("").active is False


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model, size, loss, policy", [
    ("cgan", 28, "hinge", "translation,cutout"),
    ("stylegan", 32, "non-saturating", "color,translation,cutout"),
], ids=["cgan-hinge-diffaugment", "stylegan-diffaugment"])
def test_loss_and_diffaugment_knobs_train_with_the_same_accounting(model, size, loss, policy):
    cfg = _cfg(model, size, loss=loss, diffaugment=policy, batch_size=16, local_d_steps=2,
               d_steps_per_g_step=1)
    nets = models.build(cfg)
    data = HospitalData(images=_images(64, size), labels=torch.arange(64) % 2)
    plan = DPPlan(noise_multiplier=1.0, sample_rate=sample_rate(cfg, 64), steps=2,
                  max_grad_norm=1.0, dataset_size=64)
    before = weights.to_numpy(nets)
    stats, history = train_round(nets["generator"], nets["discriminator"], data, cfg, plan, seed=3)
    assert history == [(1.0, plan.sample_rate, 2)]
    assert stats.g_steps == 2 and np.isfinite(stats.d_loss_fake) and np.isfinite(stats.g_loss)
    after = weights.to_numpy(nets)
    for prefix in ("generator.", "discriminator."):
        assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith(prefix))


# --------------------------------------------------------------------------- CycleGAN

def _cycle_setup(n: int = 5, size: int = 28, **extra):
    cfg = _cfg("cyclegan", size, identity_weight=2.0, **extra)
    nets = models.build(cfg)
    # fresh translators are the identity (zero last layer): move them off it, so that the
    # cycle and identity L1 terms are not at their kink and every layer has a gradient
    with torch.no_grad():
        for translator in (nets["generator"].ab, nets["generator"].ba):
            translator.net[-1].weight.normal_(0.0, 0.05)
    domain = torch.tensor([0, 1, 1, 0, 1][:n])
    return cfg, nets, _images(n, size), domain


def test_cyclegan_discriminator_per_image_gradients_are_each_images_own():
    cfg, nets, x, domain = _cycle_setup()
    trainer = cyclegan.CycleTrainer(nets, cfg, DiffAugment(""))
    samples = trainer.discriminator_grad_samples(x, domain, torch.Generator().manual_seed(0))
    d, g = nets["discriminator"], nets["generator"]
    for i in range(len(x)):
        xi = x[i:i + 1]
        d.zero_grad()
        with torch.no_grad():
            translated = (g.ab if domain[i] == 0 else g.ba)(xi)
        real_to, fake_to = (d.a, d.b) if domain[i] == 0 else (d.b, d.a)
        loss = losses.d_real(real_to(xi), cfg.loss).sum() + losses.d_fake(fake_to(translated), cfg.loss).sum()
        loss.backward()
        for name, p in d.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(samples[name][i], expected, rtol=1e-4, atol=1e-6,
                                       msg=f"image {i}, {name}")


def test_cyclegan_generator_per_image_gradients_include_adversarial_cycle_and_identity():
    cfg, nets, x, domain = _cycle_setup()
    trainer = cyclegan.CycleTrainer(nets, cfg, DiffAugment(""))
    samples = trainer.generator_grad_samples(x, domain, torch.Generator().manual_seed(0))
    d, g = nets["discriminator"], nets["generator"]
    order = torch.cat([torch.nonzero(domain == 0)[:, 0], torch.nonzero(domain == 1)[:, 0]])
    for row, i in enumerate(order.tolist()):
        xi = x[i:i + 1]
        g.zero_grad()
        forward, back, judge = (g.ab, g.ba, d.b) if domain[i] == 0 else (g.ba, g.ab, d.a)
        fake = forward(xi)
        loss = (losses.g_adversarial(judge(fake), cfg.loss).sum()
                + cfg.cycle_weight * (back(fake) - xi).abs().mean()
                + cfg.identity_weight * (back(xi) - xi).abs().mean())
        loss.backward()
        for name, p in g.named_parameters():
            torch.testing.assert_close(samples[name][row], p.grad, rtol=1e-4, atol=1e-6,
                                       msg=f"image {i}, {name}")
    assert all(v.shape[0] == len(x) for v in samples.values())


@pytest.mark.usefixtures("one_thread")
def test_cyclegan_round_charges_the_generator_mechanism_in_the_ledger(tmp_path):
    overrides = {"model": "cyclegan", "num_rounds": 1}
    values, cfg = smoke_values(tmp_path, **overrides), smoke_config(tmp_path, **overrides)
    content = {"weights": weights.pack(models.build(cfg))}
    from flwr.app import ConfigRecord, RecordDict
    sent = RecordDict({**content, "config": ConfigRecord({"run-id": "t", "round": 1})})
    reply = client_app.train_reply(sent, values, NODE)
    assert reply["status"]["status"] == "ok"
    entries = json.loads(reply["ledger"]["entries"])
    d_steps, g_steps = cfg.local_d_steps, cfg.local_d_steps // cfg.d_steps_per_g_step
    assert g_steps == generator_private_steps(cfg) > 0
    assert [(e["purpose"], e["steps"]) for e in entries] == \
        [("train-discriminator", d_steps), ("train-generator", g_steps)]
    sigma, q, delta = entries[0]["noise_multiplier"], entries[0]["sample_rate"], entries[0]["delta"]
    assert all((e["noise_multiplier"], e["sample_rate"]) == (sigma, q) for e in entries)
    digest = weights.record_digest(reply["weights"])
    assert [e["weights_sha256"] for e in entries] == [digest, digest]
    # an independent accountant over both mechanisms gives the claimed epsilon; without the
    # generator's steps it would be lower, so a node that skipped them would fail here
    both, only_d = RDPAccountant(), RDPAccountant()
    both.history = [(sigma, q, d_steps), (sigma, q, g_steps)]
    only_d.history = [(sigma, q, d_steps)]
    claimed = entries[-1]["epsilon"]
    assert claimed == pytest.approx(both.get_epsilon(delta), rel=1e-9)
    assert claimed > only_d.get_epsilon(delta) + 0.1
    # and sigma was calibrated so that all of the run's D and G steps reach the target
    assert sigma == calibrate_noise(cfg, entries[0]["dataset_size"], cfg.target_epsilon, delta)
    assert cfg.target_epsilon - 0.05 <= claimed <= cfg.target_epsilon
    metrics = dict(reply["metrics"])
    assert "d-loss-fake" not in metrics and "g-loss" not in metrics  # they read real scans


@pytest.mark.usefixtures("one_thread")
def test_cyclegan_generator_update_carries_the_gaussian_noise():
    # Same data, same node seed (same Poisson batches and augmentation), discriminators
    # frozen (lr-d tiny): the generators' update changes with the noise multiplier only
    # through the noise the DP optimizer adds, and is reproducible for a fixed one.
    cfg, _, x, domain = _cycle_setup()
    cfg = RunConfig.from_flat({**cfg.to_flat(), "d-steps-per-g-step": 1, "lr-d": 1e-12})
    data = HospitalData(images=x.repeat(8, 1, 1, 1), labels=domain.repeat(8))

    def generator_update(noise: float) -> np.ndarray:
        nets = models.build(cfg)
        plan = DPPlan(noise_multiplier=noise, sample_rate=0.5, steps=1, max_grad_norm=1.0,
                      dataset_size=len(data), g_steps=1)
        before = weights.to_numpy({"g": nets["generator"]})
        stats, hist = cyclegan.train_round(nets, data, cfg, plan, seed=7)
        assert hist == [(noise, 0.5, 1), (noise, 0.5, 1)]
        assert stats.d_loss_fake is None and stats.g_loss is None
        after = weights.to_numpy({"g": nets["generator"]})
        return np.concatenate([(after[k] - before[k]).ravel() for k in before])

    quiet, again, noisy = generator_update(1e-6), generator_update(1e-6), generator_update(50.0)
    np.testing.assert_array_equal(quiet, again)
    assert not np.allclose(quiet, noisy, atol=1e-6)


def test_cyclegan_refuses_a_hospital_with_one_domain_and_the_wrong_number_of_classes():
    assert cyclegan.data_problem(np.array([0, 0, 0]), ("normal", "pneumonia")) == (
        "cyclegan needs images of both domains at every hospital; this one has none of "
        "domain 'pneumonia' (only 'normal')")
    assert cyclegan.data_problem(np.array([0, 1]), ("normal", "pneumonia")) is None
    with pytest.raises(ValueError, match="exactly 2 names"):
        validate({"model": "cyclegan", "class-names": "a,b,c"})
    with pytest.raises(ValueError, match="set evaluate = false"):
        validate({"model": "cyclegan", "evaluate": True})


def test_stylegan_modulated_convolution_equals_per_image_modulated_weights():
    # the fast form (modulate inputs, shared conv, demodulate outputs) is StyleGAN2's
    # per-image weight modulation and demodulation, computed image by image here
    torch.manual_seed(0)
    conv = stylegan.ModulatedConv(6, 5, 3, 4)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
    style = conv.affine(w)
    expected = []
    for i in range(3):
        weight = conv.scale * conv.weight * style[i].view(1, 6, 1, 1)
        weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        expected.append(torch.nn.functional.conv2d(x[i:i + 1], weight, padding=1)
                        + conv.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(conv(x, w), torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_a_fresh_cyclegan_translator_is_the_identity():
    generators = models.build(_cfg("cyclegan", 28))["generator"]
    x = _images(3, 28) * 0.99
    for direction in cyclegan.DIRECTIONS:
        torch.testing.assert_close(cyclegan.translate(generators, x, direction), x,
                                   rtol=0, atol=1e-5)


def test_cyclegan_node_refuses_a_round_its_budget_covers_only_without_the_generator(tmp_path):
    # a budget between the discriminators' epsilon alone and both mechanisms': the node
    # must count the generators' steps before training, and so refuse
    from client.ledger import rdp_epsilon

    overrides = {"model": "cyclegan", "num_rounds": 1}
    cfg = smoke_config(tmp_path, **overrides)
    n, delta = 2354, 1e-5
    sigma, q = calibrate_noise(cfg, n, cfg.target_epsilon, delta), sample_rate(cfg, n)
    d_only = rdp_epsilon([(sigma, q, cfg.local_d_steps)], delta)
    both = rdp_epsilon([(sigma, q, cfg.local_d_steps), (sigma, q, generator_private_steps(cfg))],
                       delta)
    budget = (d_only + both) / 2
    values = smoke_values(tmp_path, **overrides, sim_hospital_epsilon=budget)
    from flwr.app import ConfigRecord, RecordDict
    sent = RecordDict({"weights": weights.pack(models.build(cfg)),
                       "config": ConfigRecord({"run-id": "t", "round": 1})})
    reply = client_app.train_reply(sent, values, NODE)
    assert reply["status"]["status"] == "budget-exhausted"
    assert reply["metrics"]["epsilon-next"] == pytest.approx(both, rel=1e-9)
    assert "weights" not in reply
