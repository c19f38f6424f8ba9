"""Privacy accounting: sigma is calibrated to the run's target, the spend composes across rounds,
and what the accountant sees is exactly the planned mechanism (sigma, q, local-d-steps).

Epsilon is checked against an independent computation: the Renyi divergence of the Poisson
subsampled Gaussian (Mironov, Talwar & Zhang 2019, A_alpha) integrated numerically, on a finer
grid of orders than Opacus uses, converted with the same RDP -> (epsilon, delta) bound.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import DATA, smoke_config, smoke_values
from flwr.app import ConfigRecord, RecordDict
from opacus import PrivacyEngine
from scipy.special import logsumexp

import client.train as train_mod
from client import app as client_app
from client.data import HospitalData, preprocess
from client.ledger import Ledger, rdp_epsilon
from client.node import Hospital
from client.train import DPPlan, calibrate_noise, expected_batch, sample_rate, train_round
from shared import models, weights

DELTA = 1e-5
ORDERS = np.concatenate([np.linspace(1.05, 12, 220), np.arange(12, 65)])


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """min over orders of steps * RDP_alpha(SGM) converted to epsilon (Balle et al. 2020, Thm 21).

    log A_alpha = log E_{z ~ N(0, s^2)} [((1 - q) + q exp((2z - 1) / (2 s^2)))^alpha],
    by a Riemann sum in log space over z wide enough for every order used.
    """
    z = np.linspace(-30 * sigma - 5, 30 * sigma + ORDERS.max() + 10, 100_001)
    log_mu0 = -z * z / (2 * sigma**2) - 0.5 * math.log(2 * math.pi * sigma**2)
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
    log_dz = math.log(z[1] - z[0])
    best = math.inf
    for a in ORDERS:
        rdp = steps * (logsumexp(log_mu0 + a * log_ratio) + log_dz) / (a - 1)
        best = min(best, rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a))
    return best


# --------------------------------------------------------------------------- calibration

@pytest.mark.parametrize(
    "n, batch, rounds, steps, target",
    [
        (2354, 64, 2, 4, 10.0),     # configs/smoke.toml, one of 2 hospitals
        (1570, 128, 10, 20, 10.0),  # the defaults, one of 3 hospitals
        (1570, 128, 10, 20, 1.0),   # a strict budget
        (300, 32, 3, 50, 3.0),      # a small hospital, many passes
    ],
)
def test_calibrated_sigma_reaches_the_target_over_the_whole_run(tmp_path, n, batch, rounds,
                                                                steps, target):
    cfg = smoke_config(tmp_path, batch_size=batch, num_rounds=rounds, local_d_steps=steps,
                       target_epsilon=target)
    sigma = calibrate_noise(cfg, n, target, DELTA)
    q = sample_rate(cfg, n)
    assert q == 1 / math.ceil(n / batch)
    spent = rdp_epsilon([(sigma, q, rounds * steps)], DELTA)
    assert target - 0.01 <= spent <= target
    # an independent accountant agrees (its finer grid of orders may find a slightly lower bound)
    assert spent * (1 - 5e-3) <= independent_epsilon(sigma, q, rounds * steps, DELTA) <= spent * (1 + 1e-6)
    # the whole budget is planned for all rounds: a slightly smaller sigma would overshoot
    assert rdp_epsilon([(sigma * 0.99, q, rounds * steps)], DELTA) > target


def test_a_fixed_noise_multiplier_is_used_as_given(tmp_path):
    cfg = smoke_config(tmp_path, noise_multiplier=1.7)
    assert calibrate_noise(cfg, 2354, 10.0, DELTA) == 1.7


# --------------------------------------------------------------------------- composition

def _append(ledger: Ledger, rnd: int, sigma: float, q: float, steps: int) -> dict:
    return ledger.append(run_id="r", round=rnd, mechanism="subsampled-gaussian",
                         purpose="train-discriminator", noise_multiplier=sigma, sample_rate=q,
                         steps=steps, max_grad_norm=1.0, dataset_size=2354, delta=DELTA,
                         budget_epsilon=10.0, weights_sha256="0" * 64)


def test_ledger_epsilon_composes_over_rounds_and_survives_a_restart(tmp_path):
    sigma, q, steps = 0.8, 1 / 37, 20
    ledger = Ledger(tmp_path / "state", "hospital-0")
    first = _append(ledger, 1, sigma, q, steps)["epsilon"]
    second = _append(ledger, 2, sigma, q, steps)["epsilon"]
    assert second > first > 0
    assert first == pytest.approx(independent_epsilon(sigma, q, steps, DELTA), rel=5e-3)
    assert second == pytest.approx(independent_epsilon(sigma, q, 2 * steps, DELTA), rel=5e-3)
    # RDP composes sublinearly in epsilon: two rounds cost less than twice one
    assert second < 2 * first

    reopened = Ledger(tmp_path / "state", "hospital-0")  # a node restart reads the file
    assert reopened.history() == [(sigma, q, steps), (sigma, q, steps)]
    assert reopened.epsilon(DELTA) == second
    assert reopened.epsilon_after([(sigma, q, steps)], DELTA) == pytest.approx(
        rdp_epsilon([(sigma, q, 3 * steps)], DELTA))


def _train_content(cfg, rnd: int) -> RecordDict:
    return RecordDict({"weights": weights.pack(models.build(cfg)),
                       "config": ConfigRecord({"run-id": "t", "round": rnd})})


@pytest.mark.usefixtures("one_thread")
def test_two_rounds_through_the_client_app_spend_the_planned_epsilon(tmp_path):
    values = smoke_values(tmp_path)
    cfg = smoke_config(tmp_path)
    node = {"partition-id": 0, "num-partitions": 2}
    first = client_app.train_reply(_train_content(cfg, 1), values, node)
    second = client_app.train_reply(_train_content(cfg, 2), values, node)
    m1, m2 = first["metrics"], second["metrics"]
    assert m2["epsilon"] > m1["epsilon"] > 0

    # what the plan says, computed here from the config alone
    n = 2354  # hospital 0 of 2, iid split of 4708 images
    q = 1 / math.ceil(n / cfg.batch_size)
    sigma = calibrate_noise(cfg, n, cfg.target_epsilon, min(cfg.target_delta, 1 / n))
    entries = [json.loads(r["ledger"]["entry"]) for r in (first, second)]
    for reply, entry in zip((first, second), entries):
        m = reply["metrics"]
        assert (m["num-examples"], m["steps"], m["noise-multiplier"], m["sample-rate"]) == (
            n, cfg.local_d_steps, sigma, q)
        assert (entry["noise_multiplier"], entry["sample_rate"], entry["steps"],
                entry["max_grad_norm"], entry["dataset_size"]) == (
            sigma, q, cfg.local_d_steps, cfg.max_grad_norm, n)
        assert entry["epsilon"] == m["epsilon"]
    assert m1["epsilon"] == pytest.approx(independent_epsilon(sigma, q, 4, DELTA), rel=5e-3)
    # the last round of the run lands on the target
    assert cfg.target_epsilon - 0.01 <= m2["epsilon"] <= cfg.target_epsilon

    # the node's own ledger file says the same
    ledger = Ledger(tmp_path / "hospitals" / "hospital-0", "hospital-0")
    assert ledger.history() == [(sigma, q, cfg.local_d_steps)] * 2
    assert [e["hash"] for e in ledger.entries] == [e["hash"] for e in entries]


# --------------------------------------------------------------------------- the DP step itself

@pytest.fixture(scope="module")
def small_hospital() -> HospitalData:
    """300 shuffled real PneumoniaMNIST training images, preprocessed as in training."""
    with np.load(DATA) as npz:
        order = np.random.default_rng(0).permutation(len(npz["train_labels"]))[:300]
        images = npz["train_images"][order].astype(np.float32) / 255.0
        labels = npz["train_labels"][order].reshape(-1).astype(np.int64)
    cfg = smoke_config(DATA.parent)
    return HospitalData(images=preprocess(cfg)(images).unsqueeze(1).contiguous(),
                        labels=torch.from_numpy(labels))


class _RecordingEngine(PrivacyEngine):
    """Opacus' engine, remembering the optimizer and loader it made and each noised step."""

    made: list = []

    def make_private(self, **kwargs):
        made = super().make_private(**kwargs)  # ghost mode adds a criterion before the loader
        optimizer, loader = made[1], made[-1]
        optimizer.noised_steps = 0
        inner = optimizer.pre_step

        def pre_step(*args, **kw):
            ok = inner(*args, **kw)
            optimizer.noised_steps += bool(ok)
            return ok

        optimizer.pre_step = pre_step
        _RecordingEngine.made.append((self, optimizer, loader))
        return made


@pytest.mark.usefixtures("one_thread")
def test_the_accountant_sees_exactly_the_planned_mechanism(tmp_path, small_hospital, monkeypatch):
    cfg = smoke_config(tmp_path, batch_size=32, local_d_steps=6, d_steps_per_g_step=2)
    n = len(small_hospital)
    plan = DPPlan(noise_multiplier=0.9, sample_rate=sample_rate(cfg, n),
                  steps=cfg.local_d_steps, max_grad_norm=cfg.max_grad_norm, dataset_size=n)
    assert plan.sample_rate == 1 / 10 and expected_batch(plan) == 30
    monkeypatch.setattr(train_mod, "PrivacyEngine", _RecordingEngine)
    _RecordingEngine.made = []
    nets = models.build(cfg)
    earlier = [(0.9, 0.1, 6)]  # as if one round had already been logged

    stats, history = train_round(nets["generator"], nets["discriminator"], small_hospital, cfg,
                                 plan, seed=123, accountant_history=earlier)

    (_, optimizer, loader), = _RecordingEngine.made
    assert optimizer.noise_multiplier == plan.noise_multiplier
    assert optimizer.max_grad_norm == plan.max_grad_norm
    assert loader.sample_rate == plan.sample_rate
    # one noised real-data step per discriminator step; the generated-image and generator
    # passes add no accountant steps of their own
    assert optimizer.noised_steps == plan.steps
    assert (stats.d_steps, stats.g_steps) == (6, 3)
    assert sum(s for _, _, s in history) - sum(s for _, _, s in earlier) == plan.steps
    assert {(sigma, q) for sigma, q, _ in history} == {(plan.noise_multiplier, plan.sample_rate)}
    # Opacus' hooks are removed: the shared discriminator is a plain module again
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in nets["discriminator"].parameters())
    assert math.isfinite(stats.d_loss_fake) and math.isfinite(stats.g_loss)


def test_a_plan_that_does_not_match_the_data_is_refused(tmp_path, small_hospital):
    cfg = smoke_config(tmp_path, batch_size=32)
    nets = models.build(cfg)
    wrong = DPPlan(noise_multiplier=1.0, sample_rate=1 / 5, steps=2, max_grad_norm=1.0,
                   dataset_size=len(small_hospital))
    with pytest.raises(RuntimeError, match="does not match the data actually sampled"):
        train_round(nets["generator"], nets["discriminator"], small_hospital, cfg, wrong, seed=0)


def test_simulated_hospital_delta_is_capped_at_one_over_n(tmp_path):
    cfg = smoke_config(tmp_path, target_delta=0.01)
    hospital = Hospital.from_node_config({"partition-id": 1, "num-partitions": 2}, cfg)
    assert client_app.privacy_delta(hospital, 2354) == 1 / 2354
    assert client_app.privacy_delta(hospital, 10) == 0.01
