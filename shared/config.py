"""Run configuration: every knob defined once, with its type, default, check and meaning.

The table `KNOBS` is the single source of truth. `pyproject.toml`'s
`[tool.flwr.app.config]` (the defaults Flower hands to the ServerApp and ClientApp)
must equal `defaults()`; a test keeps them in step. Run configs in `configs/*.toml`
are flat `key = value` overrides of these defaults and are validated here, before
any round starts, with one-line errors that name the file, the key and the fix.

What is *not* here: a hospital's own settings (its data, its privacy budget, its
state directory). Those belong to the hospital's node config (`client/node.py`) and
the server cannot override them.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from shared.diffaugment import valid_policy
from shared.losses import LOSSES
from shared.models import FAMILIES

Value = bool | int | float | str


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass(frozen=True)
class Knob:
    name: str
    default: Value
    help: str
    check: Callable[[Any], bool] = lambda v: True
    requirement: str = ""


def _positive(v: float) -> bool:
    return v > 0 and math.isfinite(v)


def _nonnegative(v: float) -> bool:
    return v >= 0 and math.isfinite(v)


def _fraction(v: float) -> bool:
    return 0 <= v < 1


KNOBS: tuple[Knob, ...] = (
    # --- what is trained
    Knob("model", "cgan",
         "GAN family (shared/models.py): cgan (class-conditional DCGAN), stylegan "
         "(StyleGAN-style generator: mapping network, modulated convolutions, noise inputs), "
         "cyclegan (unpaired translation between the two classes as domains).",
         lambda v: v in FAMILIES, "one of: " + ", ".join(FAMILIES)),
    Knob("image-size", 28, "Side of the square single-channel images, pixels.",
         lambda v: v in (28, 32, 64), "28, 32 or 64"),
    Knob("class-names", "normal,pneumonia",
         "Public label names, comma-separated, in label-index order.",
         lambda v: len([c for c in v.split(",") if c.strip()]) >= 1
         and len(set(c.strip() for c in v.split(","))) == len(v.split(",")),
         "a comma-separated list of distinct names"),
    Knob("latent-dim", 64, "Generator noise dimension.", _positive, "> 0"),
    Knob("g-width", 32, "Generator base channel width.", _positive, "> 0"),
    Knob("d-width", 32, "Discriminator base channel width.", _positive, "> 0"),
    Knob("init", "dcgan",
         "cgan weight initialisation: dcgan (N(0, 0.02), the seed paper's) or pytorch "
         "(PyTorch's layer defaults: the generator does not start flat grey, which matters "
         "when the budget buys few steps).",
         lambda v: v in ("dcgan", "pytorch"), "dcgan or pytorch"),
    # --- federation
    Knob("num-rounds", 10, "Federated rounds.", _positive, "> 0"),
    Knob("num-hospitals", 3, "Simulation: number of hospitals (SuperNodes).",
         _positive, "> 0"),
    Knob("min-hospitals", 1,
         "Fewest hospitals that may train a round; below it the run stops cleanly.",
         _positive, "> 0"),
    Knob("g-ema-decay", 0.5,
         "Server-side EMA of the aggregated generator over rounds (post-processing).",
         _fraction, "in [0, 1)"),
    # --- local training (per round, per hospital)
    Knob("local-d-steps", 20, "DP discriminator steps per round per hospital.",
         _positive, "> 0"),
    Knob("d-steps-per-g-step", 2, "Discriminator steps per generator step.",
         _positive, "> 0"),
    Knob("g-diversity", 1.0,
         "Weight of the generator's mode-seeking term against mode collapse (0 = off).",
         _nonnegative, ">= 0"),
    Knob("loss", "non-saturating",
         "GAN loss: non-saturating or hinge (shared/losses.py).",
         lambda v: v in LOSSES, "one of: " + ", ".join(LOSSES)),
    Knob("diffaugment", "",
         "Differentiable augmentation of real and generated images in front of the "
         "discriminator, per image (shared/diffaugment.py): comma-separated color, "
         "translation, cutout; empty = off.",
         valid_policy, "empty or a comma-separated subset of color, translation, cutout"),
    Knob("cycle-weight", 10.0, "cyclegan: weight of the cycle-consistency L1 loss.",
         _nonnegative, ">= 0"),
    Knob("identity-weight", 0.0,
         "cyclegan: weight of the identity L1 loss (0 = off; it costs a third pass of the "
         "generators over each real image).",
         _nonnegative, ">= 0"),
    Knob("batch-size", 128, "Expected Poisson batch size of real images (q = B / n).",
         _positive, "> 0"),
    Knob("lr-d", 2e-4, "Discriminator Adam learning rate.", _positive, "> 0"),
    Knob("lr-g", 2e-4, "Generator Adam learning rate.", _positive, "> 0"),
    # --- differential privacy (the federation's plan; each hospital's own budget caps it)
    Knob("target-epsilon", 10.0,
         "Epsilon each hospital reaches at the end of all rounds (noise is calibrated to it).",
         _positive, "> 0"),
    Knob("target-delta", 1e-5, "Delta; each hospital uses min(target-delta, 1/n).",
         lambda v: 0 < v < 1, "in (0, 1)"),
    Knob("max-grad-norm", 1.0, "Per-sample gradient clipping norm C.", _positive, "> 0"),
    Knob("noise-multiplier", 0.0,
         "Gaussian noise multiplier; 0 = calibrate to target-epsilon over the whole run.",
         _nonnegative, ">= 0"),
    # --- augmentation of real images (per sample, before clipping)
    Knob("augment-rotate", 5.0, "Max random rotation, degrees (0 = off).", _nonnegative, ">= 0"),
    Knob("augment-flip", False, "Random horizontal flip (off for chest X-rays: laterality).",
         lambda v: isinstance(v, bool), "true or false"),
    Knob("augment-zoom", 0.05, "Max random zoom, fraction (0 = off).", _fraction, "in [0, 1)"),
    Knob("augment-intensity", 0.05, "Max random intensity scaling, fraction (0 = off).",
         _fraction, "in [0, 1)"),
    # --- simulation data (deployment hospitals set their data in their node config)
    Knob("data-path", "data/pneumoniamnist.npz",
         "Simulation: MedMNIST .npz split across the simulated hospitals (cyclegan: its "
         "val split also gives the release's example grid, images the coordinator may "
         "publish).",
         lambda v: bool(v), "a path"),
    Knob("partition", "dirichlet", "Simulation: iid or dirichlet (label skew).",
         lambda v: v in ("iid", "dirichlet"), "iid or dirichlet"),
    Knob("dirichlet-alpha", 0.5, "Simulation: Dirichlet concentration (smaller = more skew).",
         _positive, "> 0"),
    Knob("sim-hospital-epsilon", 0.0,
         "Simulation: every simulated hospital's own epsilon budget (0 = target-epsilon, "
         "plus eval-epsilon for each planned evaluation: the release's and one every "
         "eval-every rounds).",
         _nonnegative, ">= 0"),
    # --- federated evaluation at release (docs: server/evaluation.py)
    Knob("evaluate", False,
         "Server: after the last round, evaluate the release on the hospitals' held-out "
         "images (FID, per-class FID, recall, train-on-synthetic accuracy/AUC) and check it for "
         "memorization against their training images, with DP.",
         lambda v: isinstance(v, bool), "true or false"),
    Knob("eval-every", 0,
         "Server: with evaluate = true, also evaluate after every K-th round (each costs "
         "every hospital eval-epsilon more; the scores go to metrics.csv); 0 = only at release.",
         _nonnegative, ">= 0"),
    Knob("eval-epsilon", 1.0,
         "Epsilon each hospital spends on one evaluation, all its releases together "
         "(on top of training: a hospital's budget needs this headroom).",
         _positive, "> 0"),
    Knob("eval-samples", 200, "Synthetic images per class that the evaluation scores.",
         lambda v: v >= 4, ">= 4"),
    Knob("eval-split", "test",
         "Simulation: the held-out split of data-path the hospitals evaluate on.",
         lambda v: v in ("val", "test"), "val or test"),
    Knob("eval-features", "inception",
         "Feature network: inception (the standard FID InceptionV3, offline) or tiny "
         "(a fixed random conv net: fast, for tests only, not comparable with papers).",
         lambda v: v in ("inception", "tiny"), "inception or tiny"),
    Knob("eval-fid-dims", 16,
         "DP FID is measured in a fixed random subspace of this many feature dimensions, "
         "the same for every generator (0 = all features: the standard FID space, far "
         "noisier under DP).",
         _nonnegative, ">= 0"),
    Knob("eval-memorization-train", 300,
         "Training images per hospital that the release's memorization check measures (a "
         "random subset of at most this many; their Inception pass is most of the check's time).",
         _positive, "> 0"),
    Knob("eval-clip-norm", 18.0,
         "Clipping norm of a hospital's features after centering on the synthetic mean and "
         "projecting (in full-feature units): the sensitivity of the DP FID statistics.",
         _positive, "> 0"),
    # --- downstream utility: the real-data rows of the utility table (shared/utility.py)
    Knob("utility-epsilon", 0.0,
         "Server: with evaluate = true, also train the utility table's three real-data "
         "classifiers (real, real + augmentation, real + synthetic) with DP-SGD at the "
         "hospitals and score them; each costs every hospital this epsilon (training and "
         "scores); 0 = those rows are not trained.",
         lambda v: v == 0 or (v >= 1 and math.isfinite(v)), "0 (off) or >= 1"),
    Knob("utility-rounds", 5, "Federated rounds of the utility classifiers' DP-SGD training.",
         _positive, "> 0"),
    Knob("utility-steps", 20,
         "DP-SGD steps per utility round, per hospital and classifier.", _positive, "> 0"),
    # --- outputs
    Knob("output-dir", "outputs/run", "Server: checkpoints, sample grids and the release.",
         lambda v: bool(v), "a path"),
    Knob("samples-per-class", 100, "Release: synthetic images per class.", _positive, "> 0"),
    Knob("release-candidates", 1,
         "Release: each image is the best of this many generated candidates of its class, "
         "ranked by the final discriminator (server/release.py BestOf; post-processing, no "
         "privacy cost; 1 = plain samples). Grids and the evaluation use the same images.",
         _positive, ">= 1"),
    Knob("resume", False, "Server: continue from the last checkpoint in output-dir.",
         lambda v: isinstance(v, bool), "true or false"),
    Knob("stop-after-round", 0,
         "Server: stop (as if crashed) after this round's checkpoint; 0 = never.",
         _nonnegative, ">= 0"),
    Knob("seed", 0, "Seed for model init, partitioning, sampling and noise.",
         _nonnegative, ">= 0"),
)

_BY_NAME = {k.name: k for k in KNOBS}


def defaults() -> dict[str, Value]:
    return {k.name: k.default for k in KNOBS}


def validate(values: dict[str, Any], source: str = "config") -> dict[str, Value]:
    """Check and complete a flat config: unknown keys, wrong types, out-of-range values.

    Returns the defaults overridden by `values`. Raises ConfigError with one line
    naming `source`, the key and what is expected.
    """
    out = defaults()
    for key, value in values.items():
        knob = _BY_NAME.get(key)
        if knob is None:
            close = [n for n in _BY_NAME if n.split("-")[0] == key.split("-")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
        expected = type(knob.default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if type(value) is not expected:
            raise ConfigError(
                f"{source}: {key} = {value!r}: expected {expected.__name__}"
                f" ({knob.requirement or knob.help})"
            )
        if not knob.check(value):
            raise ConfigError(f"{source}: {key} = {value!r}: must be {knob.requirement}")
        out[key] = value
    synthetic = out["eval-samples"] * len(str(out["class-names"]).split(","))
    if out["eval-fid-dims"] >= synthetic:
        raise ConfigError(
            f"{source}: eval-fid-dims = {out['eval-fid-dims']} needs more than that many synthetic "
            f"images (eval-samples x classes = {synthetic}); lower it or raise eval-samples"
        )
    if out["eval-every"] and not out["evaluate"]:
        raise ConfigError(f"{source}: eval-every = {out['eval-every']} needs evaluate = true")
    if out["utility-epsilon"] and not out["evaluate"]:
        raise ConfigError(f"{source}: utility-epsilon = {out['utility-epsilon']} needs evaluate = true")
    problem = _family_problem(out)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    if out["min-hospitals"] > out["num-hospitals"]:
        raise ConfigError(
            f"{source}: min-hospitals = {out['min-hospitals']} exceeds "
            f"num-hospitals = {out['num-hospitals']}"
        )
    return out


def _family_problem(flat: dict[str, Value]) -> str | None:
    from shared.models import family

    return family(str(flat["model"])).config_problem(flat)


def load_toml(path: Path) -> dict[str, Value]:
    """Read a run config file (flat `key = value` overrides) and validate it."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"{path}: tables are not allowed ([{nested[0]}]); use flat keys")
    return validate(raw, str(path))


@dataclass(frozen=True)
class RunConfig:
    """Typed view of a validated flat config (what the server and clients read)."""

    model: str
    image_size: int
    class_names: tuple[str, ...]
    latent_dim: int
    g_width: int
    d_width: int
    init: str
    num_rounds: int
    num_hospitals: int
    min_hospitals: int
    g_ema_decay: float
    local_d_steps: int
    d_steps_per_g_step: int
    g_diversity: float
    loss: str
    diffaugment: str
    cycle_weight: float
    identity_weight: float
    batch_size: int
    lr_d: float
    lr_g: float
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    noise_multiplier: float
    augment_rotate: float
    augment_flip: bool
    augment_zoom: float
    augment_intensity: float
    data_path: str
    partition: str
    dirichlet_alpha: float
    sim_hospital_epsilon: float
    evaluate: bool
    eval_every: int
    eval_epsilon: float
    eval_samples: int
    eval_split: str
    eval_features: str
    eval_fid_dims: int
    eval_memorization_train: int
    eval_clip_norm: float
    utility_epsilon: float
    utility_rounds: int
    utility_steps: int
    output_dir: str
    samples_per_class: int
    release_candidates: int
    resume: bool
    stop_after_round: int
    seed: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def eval_rounds(self) -> tuple[int, ...]:
        """Rounds after which the server evaluates before the release (eval-every); the
        last round's scores are the release's own evaluation."""
        if not (self.evaluate and self.eval_every):
            return ()
        return tuple(range(self.eval_every, self.num_rounds, self.eval_every))

    @property
    def planned_evaluations(self) -> int:
        """How many times each hospital is asked for eval-epsilon over the run."""
        return len(self.eval_rounds) + (1 if self.evaluate else 0)

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "run config") -> "RunConfig":
        # Flower adds keys of its own to nothing here, but a run config may carry
        # only the knobs above: anything else is a mistake worth refusing.
        flat = validate(dict(values), source)
        kwargs: dict[str, Any] = {k.replace("-", "_"): v for k, v in flat.items()}
        kwargs["class_names"] = tuple(c.strip() for c in flat["class-names"].split(","))
        return cls(**kwargs)

    def to_flat(self) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name.replace("_", "-")] = ",".join(v) if f.name == "class_names" else v
        return out
