"""The hospital's Flower ClientApp: one DP training round per `train` message.

    receive global weights + (run id, round)
    load this hospital's images (cached on the node), calibrate sigma for the run plan
    budget check: epsilon after this round's steps > the hospital's own epsilon? -> refuse
    train (client/train.py), pack weights, digest them
    append a signed entry per DP mechanism to the ledger, fsync <- spend counted here
        (the discriminator's; and the generator's where the family's generator reads
        patient images, e.g. CycleGAN: `DPPlan.mechanisms`)
    reply: weights, scalar metrics, the signed ledger entry, and the node's whole ledger
           (every entry it ever signed: the auditor recomputes epsilon from the start)

What leaves the node: model weights (outputs of DP-SGD), the public dataset size as the
FedAvg weight, losses on *generated* images only, privacy parameters, and the signed
ledger entry (numbers, hashes, the hospital's name). No pixel, label, file name, skipped
file, detail of a data error, or realised Poisson batch size. The discriminator's loss
on real images would be a statistic of the hospital's data, so it is not sent
(`d-loss-fake` is sent instead); a family whose every loss involves patient images
(CycleGAN: translations of real scans) sends no loss at all.

The hospital's budget (epsilon, delta) comes from its node config and is enforced here:
whatever the server's run config says, the node never trains past it.

An `evaluate` message (federated evaluation at release, `evaluate_reply`) is answered the
same way: budget check for all the releases it asks for, DP statistics of the held-out
images (and, for the memorization check, of the training images; client/evaluate.py),
one signed ledger entry per release, then the noised statistics and the entries --
never a feature, an image or an exact count.

A "train.utility" message (`utility_reply`: the utility table's real-data classifiers,
shared/utility.py) is a DP-SGD round of three small classifiers on the hospital's images:
budget check for the rest of that phase, one signed ledger entry per classifier, then
their weights -- the same contract as GAN training.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import evaluate as evaluation
from client import ledger as ledger_mod
from client import threads, utility
from client.data import DataError, HospitalData, data_stamp, load_hospital
from client.node import Hospital
from client.train import (PURPOSE_DISCRIMINATOR, DPPlan, calibrate_noise,
                          generator_private_steps, sample_rate, train_family_round)
from shared import evaluation as protocol
from shared import models, weights
from shared import utility as utility_protocol
from shared.classifier import SmallCNN
from shared.config import RunConfig
from shared.dp_stats import calibrate_noise_multiplier

log = logging.getLogger("fedsynth.client")

STATUS_OK = "ok"
STATUS_BUDGET = "budget-exhausted"
PURPOSE_TRAIN = PURPOSE_DISCRIMINATOR
# Knobs that change where and how the server runs, never what a node computes.
SERVER_ONLY_KNOBS = ("output-dir", "resume", "stop-after-round")

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _cached_data(hospital: Hospital, cfg: RunConfig, stamp: tuple) -> HospitalData:
    return load_hospital(hospital, cfg)


def hospital_data(hospital: Hospital, cfg: RunConfig) -> HospitalData:
    """Load once per process; reload when any data file changes.

    A DataError's message names local paths and files: it is logged here, on the node,
    and what propagates (Flower sends a ClientApp's exception text to the server) says
    only that this hospital has no usable data.
    """
    try:
        data = _cached_data(hospital, cfg, data_stamp(hospital))
        problem = models.family(cfg).data_problem(data.labels.numpy(), cfg.class_names)
        if problem:
            raise DataError(f"{hospital.data_path}: {problem}")
        return data
    except DataError as e:
        log.error("%s: %s", hospital.hospital_id, e)
        raise DataError(f"{hospital.hospital_id}: the node's data cannot be used; the node's "
                        "log says why (run `fedsynth client check-data` there)") from None


def privacy_delta(hospital: Hospital, dataset_size: int) -> float:
    """The hospital's delta, never above 1/n."""
    return min(hospital.delta_budget, 1.0 / dataset_size)


@functools.lru_cache(maxsize=16)
def _noise(cfg: RunConfig, n: int, delta: float) -> float:
    return calibrate_noise(cfg, n, cfg.target_epsilon, delta)


def plan_round(hospital: Hospital, cfg: RunConfig, n: int) -> tuple[DPPlan, float]:
    """This round's mechanism: sigma reaches target-epsilon after all the run's steps."""
    delta = privacy_delta(hospital, n)
    plan = DPPlan(noise_multiplier=_noise(cfg, n, delta), sample_rate=sample_rate(cfg, n),
                  steps=cfg.local_d_steps, max_grad_norm=cfg.max_grad_norm, dataset_size=n,
                  g_steps=generator_private_steps(cfg))
    return plan, delta


def _merged(hist: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Consecutive steps of one (sigma, q) as one entry, as Opacus' RDPAccountant keeps them."""
    out: list[tuple[float, float, int]] = []
    for sigma, q, steps in hist:
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def train_reply(content: RecordDict, run_config: dict, node_config: dict,
                node_id: int = 0) -> RecordDict:
    """The train handler without Flower's runtime around it (tests call it directly)."""
    cfg = RunConfig.from_flat(run_config)
    hospital = Hospital.from_node_config(node_config, cfg, node_id)
    instruction = content["config"]
    run_id, rnd = str(instruction["run-id"]), int(instruction["round"])

    data = hospital_data(hospital, cfg)
    n = len(data)
    plan, delta = plan_round(hospital, cfg, n)
    ledger = ledger_mod.Ledger(hospital.state_dir, hospital.hospital_id)
    spent_before = ledger.epsilon(delta)
    eps_after = ledger.epsilon_after(plan.history(), delta)
    common = {"delta": delta, "budget-epsilon": hospital.epsilon_budget,
              "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate}
    if eps_after > hospital.epsilon_budget:
        log.warning("%s: round %d would reach epsilon %.3f > budget %.3f; not training",
                    hospital.hospital_id, rnd, eps_after, hospital.epsilon_budget)
        return RecordDict({
            "status": ConfigRecord({"status": STATUS_BUDGET,
                                    "hospital-id": hospital.hospital_id}),
            "metrics": MetricRecord({"epsilon": spent_before,
                                     "epsilon-next": eps_after, **common}),
        })

    nets = models.build(cfg)
    weights.unpack(content["weights"], nets)
    # The draws depend on the whole request: an identical request (a round re-sent after
    # a crash) redraws the same noise and so releases nothing new, while two different
    # requests (other weights, other knobs) get independent noise, as the accountant
    # assumes when it composes them; shared noise would cancel in their difference.
    knobs = {k: v for k, v in cfg.to_flat().items() if k not in SERVER_ONLY_KNOBS}
    request = (weights.record_digest(content["weights"]), json.dumps(knobs, sort_keys=True))
    seed = ledger_mod.node_seed(hospital.state_dir, run_id, rnd, cfg.seed, *request)
    before = ledger.history()
    stats, hist = train_family_round(nets, data, cfg, plan, seed=seed,
                                     accountant_history=before)
    if _merged(hist) != _merged(before + plan.history()):
        raise RuntimeError(f"accountant's history {hist} is not the ledger's {before} "
                           f"plus the plan's {plan.history()}")

    # One entry per mechanism, each naming the update they produced together. The update
    # leaves only after all of them are on disk.
    arrays = weights.to_numpy(nets)
    entries = [ledger.append(
        run_id=run_id, round=rnd, mechanism="subsampled-gaussian", purpose=purpose,
        noise_multiplier=sigma, sample_rate=q, steps=steps,
        max_grad_norm=plan.max_grad_norm, dataset_size=n, delta=delta,
        budget_epsilon=hospital.epsilon_budget, weights_sha256=weights.digest(arrays),
    ) for purpose, sigma, q, steps in plan.mechanisms()]
    entry = entries[-1]
    log.info("%s: round %d trained, epsilon %.3f of %.3f", hospital.hospital_id, rnd,
             entry["epsilon"], hospital.epsilon_budget)
    losses = {"d-loss-fake": stats.d_loss_fake, "g-loss": stats.g_loss}
    return RecordDict({
        "weights": weights.pack(nets),
        "metrics": MetricRecord({
            "num-examples": n,
            **{k: v for k, v in losses.items() if v is not None},
            "epsilon": entry["epsilon"],
            "steps": plan.steps,
            "g-steps": stats.g_steps,
            "g-private-steps": plan.g_steps,
            **common,
        }),
        "status": ConfigRecord({"status": STATUS_OK, "hospital-id": hospital.hospital_id}),
        "ledger": ConfigRecord({
            "entry": json.dumps(entry, sort_keys=True),
            "entries": json.dumps(entries, sort_keys=True),
            "chain": json.dumps(ledger.entries, sort_keys=True),
            "public-key": ledger_mod.public_key_pem(ledger.public_key),
        }),
    })


@app.train()
def train(msg: Message, context: Context) -> Message:
    log.info("torch threads: %d (%s)", *threads.apply(dict(context.node_config)))
    content = train_reply(msg.content, dict(context.run_config), dict(context.node_config),
                          context.node_id)
    return Message(content=content, reply_to=msg)


def signed_reply(reply: RecordDict, hospital: Hospital, ledger: ledger_mod.Ledger,
                 entries: list[dict], metrics: dict) -> RecordDict:
    """Complete a reply of DP releases: its status, metrics (epsilon after the last entry),
    this reply's signed entries and the node's whole ledger."""
    reply["metrics"] = MetricRecord({"epsilon": entries[-1]["epsilon"], **metrics})
    reply["status"] = ConfigRecord({"status": STATUS_OK, "hospital-id": hospital.hospital_id})
    reply["ledger"] = ConfigRecord({
        "entries": json.dumps(entries, sort_keys=True),
        "chain": json.dumps(ledger.entries, sort_keys=True),
        "public-key": ledger_mod.public_key_pem(ledger.public_key),
    })
    return reply


def evaluate_reply(content: RecordDict, run_config: dict, node_config: dict,
                   node_id: int = 0) -> RecordDict:
    """The evaluate handler without Flower's runtime around it (tests call it directly).

    receive public inputs made from synthetic images (shared/evaluation.py)
    plan: one Gaussian mechanism per requested release, together eval-epsilon (RDP)
    budget check: epsilon after them > the hospital's own epsilon? -> refuse
    features of the held-out images, DP releases (client/evaluate.py)
    append a signed ledger entry per release and fsync    <- spend counted here
    reply: the noised statistics, privacy figures, the signed entries
    """
    cfg = RunConfig.from_flat(run_config)
    hospital = Hospital.from_node_config(node_config, cfg, node_id)
    instruction = content["config"]
    run_id, rnd = str(instruction["run-id"]), int(instruction["round"])
    names = protocol.parse_evaluations(str(instruction["evaluations"]))

    # delta and the ledger's dataset size are the training set's: public, and the same
    # delta as every training entry, so the ledger's epsilon stays one composition.
    n = len(hospital_data(hospital, cfg))
    delta = privacy_delta(hospital, n)
    epsilons = protocol.release_epsilons(names, cfg.eval_epsilon, delta, cfg.utility_epsilon)
    planned = {name: calibrate_noise_multiplier(epsilons[name], delta) for name in names}
    ledger = ledger_mod.Ledger(hospital.state_dir, hospital.hospital_id)
    spent_before = ledger.epsilon(delta)
    eps_after = ledger.epsilon_after([(z, 1.0, 1) for z in planned.values()], delta)
    common = {"delta": delta, "budget-epsilon": hospital.epsilon_budget,
              "eval-epsilon": cfg.eval_epsilon}
    if eps_after > hospital.epsilon_budget:
        log.warning("%s: evaluation would reach epsilon %.3f > budget %.3f; not evaluating",
                    hospital.hospital_id, eps_after, hospital.epsilon_budget)
        return RecordDict({
            "status": ConfigRecord({"status": STATUS_BUDGET,
                                    "hospital-id": hospital.hospital_id}),
            "metrics": MetricRecord({"epsilon": spent_before,
                                     "epsilon-next": eps_after, **common}),
        })

    try:
        data = evaluation.held_out_data(hospital, cfg)
    except DataError as e:  # names local paths: stays in the node's log
        log.error("%s: %s", hospital.hospital_id, e)
        raise DataError(f"{hospital.hospital_id}: no usable held-out data for evaluation; "
                        "the node's log says why") from None
    # The noise is fresh for every distinct request, yet the same request (a resumed run)
    # redraws the same: seeded by the digest of everything the request asks and sends. A
    # seed from (run-id, round) alone would put the same noise on two different queries
    # sent under one round number, and their difference would come out noise-free.
    request = [str(instruction["evaluations"])] + [
        f"{key}:{weights.record_digest(content[key])}" for key in sorted(content.array_records)]
    seed = ledger_mod.node_seed(hospital.state_dir, run_id, "evaluate", rnd, cfg.seed, *request)
    generator = torch.Generator().manual_seed(seed)
    training = hospital_data(hospital, cfg) if "memorization" in names else None
    releases = evaluation.releases(names, content, data, cfg, epsilons, delta, generator, training)

    reply = RecordDict()
    entries = []
    for release in releases:
        if release.mechanism.noise_multiplier != planned[release.name]:
            raise RuntimeError(f"{release.name}: noise multiplier "
                               f"{release.mechanism.noise_multiplier} differs from the plan")
        entries.append(ledger.append(
            run_id=run_id, round=rnd, mechanism="gaussian",
            purpose=protocol.purpose(release.name),
            noise_multiplier=release.mechanism.noise_multiplier, sample_rate=1.0, steps=1,
            max_grad_norm=release.mechanism.sensitivity, dataset_size=n, delta=delta,
            budget_epsilon=hospital.epsilon_budget,
            weights_sha256=weights.digest(release.arrays),
        ))
        reply[protocol.record_name(release.name)] = protocol.to_record(release.arrays)
    log.info("%s: evaluation released (%s), epsilon %.3f of %.3f", hospital.hospital_id,
             ", ".join(names), entries[-1]["epsilon"], hospital.epsilon_budget)
    return signed_reply(reply, hospital, ledger, entries, {"epsilon-before": spent_before, **common})


def utility_reply(content: RecordDict, run_config: dict, node_config: dict,
                  node_id: int = 0) -> RecordDict:
    """The "train.utility" handler (shared/utility.py) without Flower's runtime around it.

    receive the global utility classifiers (one per variant) and the public synthetic images
    plan: per variant, DP-SGD at its sample rate, sigma for utility-epsilon (client/utility.py)
    budget check: the rest of the phase (this and the remaining utility rounds, and the
        classifiers' DP scores after them) beyond the hospital's own epsilon? -> refuse,
        before spending anything it could not finish
    train each variant, append a signed ledger entry per variant and fsync <- spend counted
    reply: the classifiers' weights, the declared n, privacy figures, the signed entries
    """
    cfg = RunConfig.from_flat(run_config)
    hospital = Hospital.from_node_config(node_config, cfg, node_id)
    instruction = content["config"]
    run_id, rnd = str(instruction["run-id"]), int(instruction["round"])
    utility_round = int(instruction["utility-round"])
    if not cfg.utility_epsilon > 0 or not 1 <= utility_round <= cfg.utility_rounds:
        raise protocol.ProtocolError(f"utility round {utility_round} is not in this run's plan "
                                     f"(utility-epsilon {cfg.utility_epsilon:g}, "
                                     f"utility-rounds {cfg.utility_rounds})")

    data = hospital_data(hospital, cfg)
    n = len(data)
    delta = privacy_delta(hospital, n)
    synthetic_images, synthetic_labels = utility_protocol.synthetic_from_record(
        content["synthetic"], cfg.image_size, cfg.num_classes)
    records = {"real": n, "real-augmented": n, "real-synthetic": n + len(synthetic_images)}
    plans = {v: utility.plan_variant(cfg, records[v], delta) for v in utility_protocol.VARIANTS}
    ledger = ledger_mod.Ledger(hospital.state_dir, hospital.hospital_id)
    spent_before = ledger.epsilon(delta)
    remaining = cfg.utility_rounds - utility_round + 1
    counts = protocol.release_epsilons(list(protocol.UTILITY_RELEASES), cfg.eval_epsilon, delta,
                                       cfg.utility_epsilon)
    planned = ([h for p in plans.values() for h in p.history()] * remaining
               + [(calibrate_noise_multiplier(e, delta), 1.0, 1) for e in counts.values()])
    eps_after = ledger.epsilon_after(planned, delta)
    common = {"delta": delta, "budget-epsilon": hospital.epsilon_budget,
              "utility-epsilon": cfg.utility_epsilon}
    if eps_after > hospital.epsilon_budget:
        log.warning("%s: the utility classifiers would reach epsilon %.3f > budget %.3f; "
                    "not training them", hospital.hospital_id, eps_after, hospital.epsilon_budget)
        return RecordDict({
            "status": ConfigRecord({"status": STATUS_BUDGET, "hospital-id": hospital.hospital_id}),
            "metrics": MetricRecord({"epsilon": spent_before, "epsilon-next": eps_after, **common}),
        })

    # Seeded by the node's secret and the whole request (as in train_reply).
    request = [f"{key}:{weights.record_digest(content[key])}" for key in sorted(content.array_records)]
    seed = ledger_mod.node_seed(hospital.state_dir, run_id, "utility", rnd, utility_round,
                                cfg.seed, *request)
    reply, entries = RecordDict(), []
    for i, (variant, plan) in enumerate(plans.items()):
        key = utility_protocol.classifier_key(variant)
        model = protocol.load_classifier(content[key], SmallCNN(cfg.num_classes))
        images, labels = data.images, data.labels.reshape(-1)
        if variant == "real-synthetic":
            images = torch.cat([images, synthetic_images])
            labels = torch.cat([labels, synthetic_labels])
        history = utility.train_variant(model, images, labels, augment=variant == "real-augmented",
                                        plan=plan, cfg=cfg, seed=seed + 10 * i)
        if history != plan.history():
            raise RuntimeError(f"{variant}: accountant's history {history} is not the plan's "
                               f"{plan.history()}")
        record = protocol.classifier_record(model)
        entries.append(ledger.append(
            run_id=run_id, round=rnd, mechanism="subsampled-gaussian",
            purpose=utility_protocol.train_purpose(variant),
            noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
            steps=plan.steps, max_grad_norm=plan.max_grad_norm, dataset_size=n, delta=delta,
            budget_epsilon=hospital.epsilon_budget,
            weights_sha256=weights.digest(protocol.record_arrays(record)),
        ))
        reply[key] = record
    log.info("%s: utility round %d trained, epsilon %.3f of %.3f", hospital.hospital_id,
             utility_round, entries[-1]["epsilon"], hospital.epsilon_budget)
    return signed_reply(reply, hospital, ledger, entries,
                        {"num-examples": n, "epsilon-before": spent_before, **common})


@app.train("utility")
def train_utility(msg: Message, context: Context) -> Message:
    threads.apply(dict(context.node_config))
    content = utility_reply(msg.content, dict(context.run_config), dict(context.node_config),
                            context.node_id)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    threads.apply(dict(context.node_config))
    content = evaluate_reply(msg.content, dict(context.run_config), dict(context.node_config),
                             context.node_id)
    return Message(content=content, reply_to=msg)
