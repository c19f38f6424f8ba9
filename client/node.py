"""A hospital's own settings: its data, how to read it, its state directory and its budget.

In a real deployment they come from the SuperNode's `--node-config` and belong to the
hospital: the server's run config cannot change them, nor which of the hospital's files
are read. Keys:

    hospital-id      name used in the ledger and in reports          (default: node id)
    data-path        .npz file (MedMNIST layout) or a folder of scans (required)
    state-dir        where the ledger, keys and caches live           (required)
    epsilon          the hospital's total epsilon budget              (required)
    delta            the hospital's delta                             (default 1e-5)
    eval-data-path   held-out scans (folder or .npz) for federated evaluation (default:
                     the run's eval-split of data-path if that is a .npz; a folder of
                     scans has no held-out split, so without it evaluation is declined)

For a folder of scans (`client.sources` reads it; ignored for a .npz file):

    data-format      auto | dicom | png | nifti                       (default auto: by file)
    label-from       subfolder | csv | dicom-attribute | none         (default subfolder)
    label-manifest   CSV with header `file,label` or `SOPInstanceUID,label`; a relative
                     path is relative to data-path                    (label-from = csv)
    label-attribute  DICOM keyword giving the label, e.g. Modality or BodyPartExamined
                     (label-from = dicom-attribute; default Modality)
    nifti-axis       axis along which NIfTI volumes are sliced: 0, 1 or 2 (default 2)
    window-center    CT window center and width in HU, set together   (default: the
    window-width     file's own window, else min-max)
    min-size         smallest height or width kept, pixels            (default 16)
    preprocess-cache keep decoded, preprocessed images in state-dir/cache (default true)

How the node computes (client/threads.py):

    torch-threads    torch intra-op threads (default: Ray's CPU allocation in simulation,
                     else the cores the process may use)

Labels (subfolder names, CSV values, attribute values) are matched against the run
config's public `class-names`; a value of decimal digits is a class index. A file whose
label is not among them is skipped and reported, never turned into a new class.

In simulation there is no node config beyond Flower's `partition-id` and
`num-partitions`, so the simulated hospitals take their data from the run config's
`data-path` partition, their state from `<output-dir>/hospitals/hospital-<id>`, and
their budget from `sim-hospital-epsilon` (or `target-epsilon`, plus `eval-epsilon` for each
evaluation the run plans and utility-epsilon per utility classifier: `simulated_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword

from client.deidentify import IDENTIFYING_KEYWORDS
from client.sources import FORMATS, LABEL_FROM, SourceSettings
from shared.config import ConfigError, RunConfig
from shared.utility import VARIANTS as UTILITY_VARIANTS

NODE_KEYS = (
    "hospital-id", "data-path", "state-dir", "epsilon", "delta", "eval-data-path",
    "data-format", "label-from", "label-manifest", "label-attribute", "nifti-axis",
    "window-center", "window-width", "min-size", "preprocess-cache", "torch-threads",
)


@dataclass(frozen=True)
class Hospital:
    hospital_id: str
    data_path: Path
    state_dir: Path
    epsilon_budget: float
    delta_budget: float
    partition_id: int | None = None      # simulation only: which share of data-path
    num_partitions: int | None = None
    # How a folder of scans is read (root = data_path; class names come from the run).
    source: SourceSettings = field(default_factory=lambda: SourceSettings(root=Path(".")))
    preprocess_cache: bool = True
    eval_data_path: Path | None = None   # held-out data for evaluation (see eval-data-path)

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], cfg: RunConfig,
                         node_id: int = 0) -> "Hospital":
        if "partition-id" in node_config and "data-path" not in node_config:
            pid = int(node_config["partition-id"])
            data_path = Path(cfg.data_path)
            return cls(
                hospital_id=f"hospital-{pid}",
                data_path=data_path,
                state_dir=Path(cfg.output_dir) / "hospitals" / f"hospital-{pid}",
                epsilon_budget=cfg.sim_hospital_epsilon or simulated_budget(cfg),
                delta_budget=cfg.target_delta,
                partition_id=pid,
                num_partitions=int(node_config["num-partitions"]),
                source=SourceSettings(root=data_path),
            )
        unknown = sorted(set(node_config) - set(NODE_KEYS) - {"partition-id", "num-partitions"})
        if unknown:
            raise ConfigError(f"node config: unknown key '{unknown[0]}' (known: {', '.join(NODE_KEYS)})")
        for key in ("data-path", "state-dir", "epsilon"):
            if key not in node_config:
                raise ConfigError(f"node config: '{key}' is required (e.g. --node-config \"{key}=...\")")
        epsilon = _number(node_config, "epsilon", float)
        delta = _number(node_config, "delta", float, 1e-5)
        if not epsilon > 0:
            raise ConfigError(f"node config: epsilon = {epsilon}: must be > 0")
        if not 0 < delta < 1:
            raise ConfigError(f"node config: delta = {delta}: must be in (0, 1)")
        data_path = Path(str(node_config["data-path"]))
        return cls(
            hospital_id=str(node_config.get("hospital-id", f"node-{node_id}")),
            data_path=data_path,
            state_dir=Path(str(node_config["state-dir"])),
            epsilon_budget=epsilon,
            delta_budget=delta,
            source=source_settings(node_config, data_path),
            preprocess_cache=_flag(node_config, "preprocess-cache", True),
            eval_data_path=(Path(str(node_config["eval-data-path"]))
                            if node_config.get("eval-data-path") else None),
        )


def simulated_budget(cfg: RunConfig) -> float:
    """A simulated hospital's epsilon when sim-hospital-epsilon is 0: the training target,
    plus eval-epsilon for every planned evaluation (the release's, and one every eval-every
    rounds), plus utility-epsilon for each of the utility table's three real-data
    classifiers (shared/utility.py): training is calibrated to reach target-epsilon, so
    without that headroom every hospital would refuse to evaluate. RDP composes them to less
    than their sum; each node's ledger checks the exact figure."""
    return (cfg.target_epsilon + cfg.eval_epsilon * cfg.planned_evaluations
            + cfg.utility_epsilon * len(UTILITY_VARIANTS))


def source_settings(node_config: dict[str, Any], data_path: Path) -> SourceSettings:
    """The `client.sources` settings the node config gives; one-line ConfigError if bad."""
    fmt = str(node_config.get("data-format", "auto"))
    if fmt not in FORMATS:
        raise ConfigError(f"node config: data-format = {fmt!r}: must be one of {', '.join(FORMATS)}")
    label_from = str(node_config.get("label-from", "subfolder"))
    if label_from not in LABEL_FROM:
        raise ConfigError(f"node config: label-from = {label_from!r}: must be one of "
                          f"{', '.join(LABEL_FROM)}")
    manifest = node_config.get("label-manifest")
    if label_from == "csv" and not manifest:
        raise ConfigError("node config: label-from = 'csv' needs label-manifest=<CSV of file,label>")
    manifest_path = None
    if manifest:
        manifest_path = Path(str(manifest))
        if not manifest_path.is_absolute():
            manifest_path = data_path / manifest_path
    axis = _number(node_config, "nifti-axis", int, 2)
    if axis not in (0, 1, 2):
        raise ConfigError(f"node config: nifti-axis = {axis}: must be 0, 1 or 2")
    center = _number(node_config, "window-center", float, None)
    width = _number(node_config, "window-width", float, None)
    if (center is None) != (width is None):
        raise ConfigError("node config: window-center and window-width must be set together")
    if width is not None and not width > 0:
        raise ConfigError(f"node config: window-width = {width}: must be > 0 (HU)")
    attribute = str(node_config.get("label-attribute", "Modality"))
    if tag_for_keyword(attribute) is None:
        raise ConfigError(f"node config: label-attribute = {attribute!r}: not a DICOM keyword "
                          "(e.g. Modality, BodyPartExamined)")
    if attribute in IDENTIFYING_KEYWORDS:
        raise ConfigError(f"node config: label-attribute = {attribute!r} identifies patients; "
                          "use a technical attribute such as Modality or BodyPartExamined")
    min_size = _number(node_config, "min-size", int, 16)
    if min_size < 1:
        raise ConfigError(f"node config: min-size = {min_size}: must be >= 1 (pixels)")
    return SourceSettings(
        root=data_path, format=fmt, label_from=label_from, label_manifest=manifest_path,
        label_attribute=attribute,
        nifti_axis=axis, window_center=center, window_width=width, min_size=min_size,
    )


def _number(node_config: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    if key not in node_config:
        if default is ...:
            raise ConfigError(f"node config: '{key}' is required")
        return default
    value = node_config[key]
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
        if kind is int and float(value) != number:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"node config: {key} = {value!r}: expected {kind.__name__}") from None
    return number


def _flag(node_config: dict[str, Any], key: str, default: bool) -> bool:
    value = node_config.get(key, default)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"node config: {key} = {value!r}: expected true or false")
