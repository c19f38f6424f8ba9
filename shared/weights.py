"""Pack named networks into one Flower ArrayRecord, and unpack with checks on the way in.

Keys are `<network>.<state-dict key>` (e.g. `generator.body.0.weight`), so any set of
named networks travels in one record and FedAvg averages each tensor on its own.
BatchNorm's `num_batches_tracked` counters are not sent: they are integer bookkeeping
that averaging would corrupt and that momentum-based running stats do not use.

Unpacking refuses anything that is not exactly the expected set of float32 tensors of
the expected shapes with finite values: a bad update is rejected whole, never applied
in part.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


class WeightsError(ValueError):
    """An ArrayRecord does not match the networks it should load into."""


def _sent_items(net: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")
    }


def to_numpy(networks: dict[str, nn.Module]) -> dict[str, np.ndarray]:
    """Flat {prefixed key: float32 array} of every sent tensor."""
    return {
        f"{name}.{key}": t.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, net in networks.items()
        for key, t in _sent_items(net).items()
    }


def pack(networks: dict[str, nn.Module]) -> ArrayRecord:
    return ArrayRecord(
        array_dict={k: Array(v) for k, v in to_numpy(networks).items()}
    )


def unpack(record: ArrayRecord, networks: dict[str, nn.Module]) -> None:
    """Load `record` into `networks` in place after checking keys, dtypes, shapes, values."""
    expected = {
        f"{name}.{key}": (name, key, t)
        for name, net in networks.items()
        for key, t in _sent_items(net).items()
    }
    missing = sorted(set(expected) - set(record.keys()))
    unknown = sorted(set(record.keys()) - set(expected))
    if missing or unknown:
        raise WeightsError(
            f"weights do not match the model: missing {missing[:3]}, unexpected {unknown[:3]}"
        )
    loaded: dict[str, dict[str, torch.Tensor]] = {name: {} for name in networks}
    for full_key, (name, key, current) in expected.items():
        array = record[full_key]
        if array.dtype != "float32":
            raise WeightsError(f"{full_key}: dtype {array.dtype}, expected float32")
        if tuple(array.shape) != tuple(current.shape):
            raise WeightsError(
                f"{full_key}: shape {tuple(array.shape)}, expected {tuple(current.shape)}"
            )
        value = array.numpy()
        if not np.isfinite(value).all():
            raise WeightsError(f"{full_key}: contains NaN or infinity")
        loaded[name][key] = torch.from_numpy(value.copy())
    for name, net in networks.items():
        net.load_state_dict(loaded[name], strict=False)


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of a set of named arrays, independent of dict order and of Flower's encoding.

    Hashes, for each key in sorted order: the key, dtype, shape and the C-order bytes.
    The client puts this digest of the update it sends into its signed ledger entry; the
    server computes it of the update it received; the auditor compares the two.
    """
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def record_digest(record: ArrayRecord) -> str:
    """`digest` of an ArrayRecord as received."""
    return digest({k: record[k].numpy() for k in record.keys()})
