"""Compare the model families and the mode-collapse options at one privacy budget.

    python -m benchmarks.compare_models                  # writes benchmarks/MODELS.md
    python -m benchmarks.compare_models --rounds 3 --steps 10 --only cgan,cgan-hinge

Every variant gets the same federation: the same hospitals (PneumoniaMNIST's train split,
iid across `--hospitals`), the same image size (32 px, the one size all three families
share), rounds, DP steps per round, batch size, widths and target epsilon. Rounds run in
this process through the real hospital handler (`client.app.train_reply`: DP-SGD,
budget check, signed ledger) and the server's FedAvg and EMA (`server.strategy`), without
Flower's transport (the Simulation Engine adds start-up time, not a different result).

Scores are computed centrally on PneumoniaMNIST's public test split, without DP (this is a
benchmark on public data, not a release): for generators from noise, FID and KID in the
features of `--features` (default "tiny": a fixed random conv net, fast on 2 cores but not
comparable with published FIDs), improved precision/recall, per-class FID, and TSTR (a
SmallCNN trained on synthetic images only, accuracy and ROC AUC on the real test images);
for the CycleGAN, SSIM between each test image and its translation (structure kept) and
the share of translations that a SmallCNN trained on real images assigns to the target
class. Wall-clock is the training time of all rounds of all hospitals on this machine.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torchmetrics.functional.image import structural_similarity_index_measure

from benchmarks.timing import machine
from client import app as client_app
from client.data import preprocess
from server.release import SAMPLE_SEED_OFFSET, generator_from, generate, sampler_weights
from server.strategy import FedAvg, ema
from shared import cyclegan, models, weights
from shared.classifier import evaluate_classifier, predict_proba, train_classifier
from shared.config import RunConfig, validate
from shared.features import extract_features, feature_network, uint8_to_unit_range
from shared.metrics import frechet_distance, kernel_distance, precision_recall

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "pneumoniamnist.npz"
OUT = Path(__file__).resolve().parent / "MODELS.md"

# name -> knob overrides on top of the shared base
VARIANTS: dict[str, dict] = {
    "cgan": {"model": "cgan"},
    "cgan-hinge": {"model": "cgan", "loss": "hinge"},
    "cgan-diffaugment": {"model": "cgan", "diffaugment": "translation,cutout"},
    "cgan-no-mode-seeking": {"model": "cgan", "g-diversity": 0.0},
    "stylegan": {"model": "stylegan"},
    "stylegan-hinge": {"model": "stylegan", "loss": "hinge"},
    "stylegan-diffaugment": {"model": "stylegan", "diffaugment": "translation,cutout"},
    "cyclegan": {"model": "cyclegan"},
    "cyclegan-diffaugment": {"model": "cyclegan", "diffaugment": "translation,cutout"},
}


def base_values(args, output_dir: Path) -> dict:
    return {"image-size": 32, "num-rounds": args.rounds, "num-hospitals": args.hospitals,
            "local-d-steps": args.steps, "d-steps-per-g-step": 2, "batch-size": args.batch,
            "g-width": args.width, "d-width": args.width, "latent-dim": 32,
            "target-epsilon": args.epsilon, "partition": "iid", "data-path": str(DATA),
            "output-dir": str(output_dir), "samples-per-class": args.samples,
            "g-ema-decay": 0.5, "seed": 0}


def federate(values: dict, hospitals: int) -> tuple[RunConfig, dict, dict, float, float]:
    """All rounds, in process: (cfg, global weights, EMA generator, seconds, max epsilon)."""
    cfg = RunConfig.from_flat(values)
    global_w = weights.to_numpy(models.build(cfg))
    ema_w = None
    nodes = [{"partition-id": i, "num-partitions": hospitals} for i in range(hospitals)]
    started, epsilon = time.perf_counter(), 0.0
    for rnd in range(1, cfg.num_rounds + 1):
        fedavg = FedAvg()
        for node in nodes:
            content = RecordDict({"weights": weights.pack(_load(cfg, global_w)),
                                  "config": ConfigRecord({"run-id": "compare", "round": rnd})})
            reply = client_app.train_reply(content, values, node)
            if reply["status"]["status"] != "ok":
                raise RuntimeError(f"hospital {node['partition-id']} refused round {rnd}")
            record = reply["weights"]
            fedavg.add({k: record[k].numpy() for k in record.keys()},
                       int(reply["metrics"]["num-examples"]))
            epsilon = max(epsilon, float(reply["metrics"]["epsilon"]))
        global_w = fedavg.result()
        ema_w = ema(ema_w, {k: v for k, v in global_w.items() if k.startswith("generator.")},
                    cfg.g_ema_decay)
    return cfg, global_w, ema_w, time.perf_counter() - started, epsilon


def _load(cfg: RunConfig, arrays: dict) -> dict:
    nets = models.build(cfg)
    weights.unpack(_record(arrays), nets)
    return nets


def _record(arrays: dict):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})


def real_test(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(DATA) as npz:
        images, labels = npz["test_images"], npz["test_labels"].reshape(-1).astype(np.int64)
    x = preprocess(cfg)(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.as_tensor(labels)


def score_sampler(cfg: RunConfig, sampler: dict, features_name: str) -> dict:
    """sampler: the EMA generator's weights (and the discriminator's: `sampler_weights`)."""
    real, real_labels = real_test(cfg)
    labels = np.repeat(np.arange(cfg.num_classes), cfg.samples_per_class)
    fake = uint8_to_unit_range(generate(generator_from(cfg, sampler), labels, cfg.latent_dim,
                                        cfg.seed + SAMPLE_SEED_OFFSET + 1))
    net = feature_network(features_name)
    f_real, f_fake = extract_features(net, real).double(), extract_features(net, fake).double()
    kid, _ = kernel_distance(f_real, f_fake, subsets=20,
                             subset_size=min(len(f_real), len(f_fake), 200))
    pr = precision_recall(f_real, f_fake)
    per_class = [frechet_distance(f_real[real_labels == c], f_fake[torch.as_tensor(labels) == c])
                 for c in range(cfg.num_classes)]
    classifier = train_classifier(fake, torch.as_tensor(labels), epochs=5, augment=False,
                                  seed=0, num_classes=cfg.num_classes)
    tstr = evaluate_classifier(classifier, real, real_labels)
    return {"FID": frechet_distance(f_real, f_fake), "KID": kid, **pr,
            "per-class FID": " / ".join(f"{v:.1f}" for v in per_class),
            "TSTR acc": tstr["accuracy"], "TSTR AUC": tstr["auc"]}


def score_translator(cfg: RunConfig, ema_w: dict, judge) -> dict:
    real, labels = real_test(cfg)
    generators = generator_from(cfg, ema_w)
    ssim, judged = [], {}
    for d, direction in enumerate(cyclegan.DIRECTIONS):
        x = real[labels == d][:200]
        y = cyclegan.translate(generators, x, direction)
        ssim.append(structural_similarity_index_measure(y, x, data_range=2.0,
                                                        reduction="none"))
        target = cfg.class_names[1 - d]
        judged[f"{cfg.class_names[d]}->{target} judged {target}"] = float(
            (predict_proba(judge, y).argmax(dim=1) == 1 - d).double().mean())
    return {"SSIM(input, translation)": float(torch.cat(ssim).mean()), **judged}


def score_untranslated(cfg: RunConfig, judge) -> dict:
    """The translator table's baseline: the same scores for the inputs left as they are
    (SSIM 1; the judge's own rate of calling a real image the other class)."""
    real, labels = real_test(cfg)
    out = {"SSIM(input, translation)": 1.0}
    for d in range(2):
        target = cfg.class_names[1 - d]
        x = real[labels == d][:200]
        out[f"{cfg.class_names[d]}->{target} judged {target}"] = float(
            (predict_proba(judge, x).argmax(dim=1) == 1 - d).double().mean())
    return out


def real_classifier(cfg: RunConfig) -> torch.nn.Module:
    with np.load(DATA) as npz:
        images, labels = npz["train_images"], npz["train_labels"].reshape(-1).astype(np.int64)
    x = preprocess(cfg)(images.astype(np.float32) / 255.0).unsqueeze(1)
    return train_classifier(x, torch.as_tensor(labels), epochs=3, augment=False, seed=0,
                            num_classes=cfg.num_classes)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_models",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="DP discriminator steps per round")
    parser.add_argument("--hospitals", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--samples", type=int, default=200, help="synthetic images per class")
    parser.add_argument("--features", default="tiny", choices=("tiny", "inception"))
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for message in (".*Secure RNG turned off.*", ".*Full backward hook is firing.*",
                    ".*Optimal order is the largest alpha.*", ".*performance drop.*"):
        warnings.filterwarnings("ignore", message=message)
    names = [n for n in (args.only.split(",") if args.only else VARIANTS)]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    command = "python -m benchmarks.compare_models" + "".join(
        " " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    sampler_rows, translator_rows = [], []
    judge, translator_cfg = None, None
    for name in names:
        with tempfile.TemporaryDirectory(prefix="fedsynth-compare-") as tmp:
            values = validate({**base_values(args, Path(tmp)), **VARIANTS[name],
                               "sim-hospital-epsilon": args.epsilon})
            cfg, global_w, ema_w, seconds, epsilon = federate(values, args.hospitals)
            if models.family(cfg).release == "translator":
                judge = judge or real_classifier(cfg)
                translator_cfg = cfg
                scores = score_translator(cfg, ema_w, judge)
                translator_rows.append((name, epsilon, seconds, scores))
            else:
                scores = score_sampler(cfg, sampler_weights(global_w, ema_w), args.features)
                sampler_rows.append((name, epsilon, seconds, scores))
        print(f"{name}: epsilon {epsilon:.2f}, {seconds:.0f} s, "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in scores.items()), flush=True)

    lines = [f"# `{command}`", "",
             f"Machine: {machine(args.threads)}. Every variant: {args.hospitals} hospitals "
             f"(PneumoniaMNIST train split, iid), 32 px, {args.rounds} rounds x {args.steps} "
             f"DP discriminator steps, batch {args.batch}, widths {args.width}, target "
             f"epsilon {args.epsilon:g} per hospital (delta 1e-5); scores on the public test "
             f"split, features `{args.features}`, {args.samples} synthetic images per class.", ""]
    if judge is not None:
        translator_rows.append(("(untranslated inputs)", float("nan"), 0.0,
                                score_untranslated(translator_cfg, judge)))
    for rows in (sampler_rows, translator_rows):
        if not rows:
            continue
        keys = list(rows[0][3])
        lines.append("| variant | epsilon | wall-clock (s) | " + " | ".join(keys) + " |")
        lines.append("|---" * (3 + len(keys)) + "|")
        for name, epsilon, seconds, scores in rows:
            lines.append(f"| {name} | {epsilon:.2f} | {seconds:.0f} | "
                         + " | ".join(_fmt(scores[k]) for k in keys) + " |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        previous = args.out.read_text() if args.out.exists() else ""
        marker = "<!-- results -->"
        head = previous.split(marker)[0] if marker in previous else ""
        args.out.write_text(head + marker + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
