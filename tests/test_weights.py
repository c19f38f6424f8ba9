"""Weights travel as one ArrayRecord; anything but the exact expected tensors is refused whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from shared import models, weights
from shared.config import RunConfig, validate
from shared.weights import WeightsError

CFG = RunConfig.from_flat(validate({"g-width": 8, "d-width": 8, "latent-dim": 16}))


def _fresh(seed: int = 0) -> dict:
    return models.build(RunConfig.from_flat({**CFG.to_flat(), "seed": seed}))


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})


def test_pack_unpack_round_trip_is_exact():
    source, target = _fresh(1), _fresh(2)
    weights.unpack(weights.pack(source), target)
    expected, got = weights.to_numpy(source), weights.to_numpy(target)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # BatchNorm running statistics travel too; only its integer step counter does not
    assert "generator.project.2.running_mean" in expected
    assert not any(k.endswith("num_batches_tracked") for k in expected)
    assert all(a.dtype == np.float32 for a in expected.values())


def test_keys_are_prefixed_with_the_network_name():
    keys = weights.to_numpy(_fresh()).keys()
    assert {k.split(".", 1)[0] for k in keys} == {"generator", "discriminator"}


def _refused(arrays: dict[str, np.ndarray], match: str) -> None:
    target = _fresh(2)
    before = weights.to_numpy(target)
    with pytest.raises(WeightsError, match=match):
        weights.unpack(_record(arrays), target)
    after = weights.to_numpy(target)  # rejected whole: nothing was loaded
    assert all(np.array_equal(before[k], after[k]) for k in before)


KEY = "discriminator.linear.weight"


def test_wrong_shape_is_refused():
    arrays = weights.to_numpy(_fresh())
    arrays[KEY] = arrays[KEY][:, :-1].copy()
    _refused(arrays, rf"{KEY}: shape \(1, 511\), expected \(1, 512\)")


def test_float64_is_refused():
    arrays = weights.to_numpy(_fresh())
    arrays[KEY] = arrays[KEY].astype(np.float64)
    _refused(arrays, rf"{KEY}: dtype float64, expected float32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    arrays = weights.to_numpy(_fresh())
    arrays[KEY][0, 3] = bad
    _refused(arrays, f"{KEY}: contains NaN or infinity")


def test_missing_key_is_refused():
    arrays = weights.to_numpy(_fresh())
    del arrays[KEY]
    _refused(arrays, rf"missing \['{KEY}'\], unexpected \[\]")


def test_extra_key_is_refused():
    arrays = weights.to_numpy(_fresh())
    arrays["discriminator.minibatch_std"] = np.zeros(3, np.float32)
    _refused(arrays, r"missing \[\], unexpected \['discriminator.minibatch_std'\]")


def test_digest_ignores_dict_order_and_sees_one_changed_value():
    arrays = weights.to_numpy(_fresh())
    reversed_order = dict(reversed(list(arrays.items())))
    assert list(reversed_order) != list(arrays)
    assert weights.digest(reversed_order) == weights.digest(arrays)

    changed = {k: v.copy() for k, v in arrays.items()}
    changed[KEY][0, 0] = np.nextafter(changed[KEY][0, 0], np.float32(1))  # one ulp
    assert weights.digest(changed) != weights.digest(arrays)

    renamed = {("x" + k if k == KEY else k): v for k, v in arrays.items()}
    assert weights.digest(renamed) != weights.digest(arrays)
    reshaped = {k: (v.reshape(-1) if k == KEY else v) for k, v in arrays.items()}
    assert weights.digest(reshaped) != weights.digest(arrays)


def test_record_digest_equals_digest_of_what_was_packed():
    nets = _fresh()
    assert weights.record_digest(weights.pack(nets)) == weights.digest(weights.to_numpy(nets))


def test_unpacked_networks_compute_the_same_function():
    source, target = _fresh(1), _fresh(2)
    weights.unpack(weights.pack(source), target)
    z, y = torch.randn(3, CFG.latent_dim), torch.tensor([0, 1, 0])
    source["generator"].eval(), target["generator"].eval()
    with torch.no_grad():
        torch.testing.assert_close(target["generator"](z, y), source["generator"](z, y),
                                   rtol=0, atol=0)
