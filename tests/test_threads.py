"""Torch threads follow the hospital's node config, else Ray's allocation, else the cores."""

from __future__ import annotations

import pytest

from client import threads
from shared.config import ConfigError


def test_the_node_config_wins():
    assert threads.choose({"torch-threads": 3}, {"OMP_NUM_THREADS": "1"}) == (
        3, "node config torch-threads")


def test_rays_allocation_is_used_in_simulation_but_never_above_the_cores():
    n, source = threads.choose({}, {"OMP_NUM_THREADS": "1"})
    assert (n, source.split()[0]) == (1, "OMP_NUM_THREADS")
    n, _ = threads.choose({}, {"OMP_NUM_THREADS": "4096"})
    assert n == threads.available_cores()


def test_without_either_all_available_cores():
    assert threads.choose({}, {}) == (threads.available_cores(), "cores available to the process")


@pytest.mark.parametrize("bad", [0, -2, "many", True])
def test_a_bad_value_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="torch-threads"):
        threads.choose({"torch-threads": bad}, {})
