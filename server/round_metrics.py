"""metrics.csv: one row per completed round, every figure the run produced for it.

    <output-dir>/metrics.csv       rewritten after every round (and after the release's
                                   evaluation); a copy goes into release/metrics.csv
    columns
        round, evaluation          "" | "interim" (eval-every) | "release"
        hospitals                  how many hospitals trained the round
        epsilon_max                the largest epsilon any hospital reported this round
        <hospital>/epsilon, <hospital>/budget-epsilon, <hospital>/g-loss,
        <hospital>/d-loss-fake, <hospital>/num-examples
                                   each training reply's figures: DP epsilon and the
                                   hospital's budget, losses on generated images, the public
                                   dataset size
        <score>, <score>.<size>    every numeric score of the round's evaluation under its
                                   path in release.json's ``evaluation.scores``, e.g. ``fid``,
                                   ``fid.real_count``, ``fid_per_class.normal``,
                                   ``recall.synthetic_count``, ``memorization.flagged``
        eval_epsilon_after/<hospital>
                                   each evaluating hospital's epsilon after the evaluation

Everything here comes from the server's state (the hospitals' DP replies and scores computed
from them): writing it costs no privacy. ``fedsynth report`` plots it (server/report.py).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Iterable

from server.checkpoint import ServerState

FILENAME = "metrics.csv"
FIRST_COLUMNS = ("round", "evaluation", "hospitals", "epsilon_max")
HOSPITAL_FIGURES = ("epsilon", "budget-epsilon", "g-loss", "d-loss-fake", "num-examples")


def flatten_scores(scores: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of an ``evaluation.scores`` section, keyed by their dotted path.

    A dict's ``value`` is the score itself (``fid``), its other numbers are sample sizes and
    details (``fid.real_count``); ``privacy`` records, notes and lists are left out; booleans
    become 0/1.
    """
    out: dict[str, float] = {}
    for key, value in scores.items():
        if key in ("privacy", "note"):
            continue
        path = prefix if key == "value" and prefix else (f"{prefix}.{key}" if prefix else key)
        if isinstance(value, dict):
            out.update(flatten_scores(value, path))
        elif isinstance(value, bool):
            out[path] = float(value)
        elif isinstance(value, (int, float)) and value is not None:
            out[path] = float(value)
    return out


def evaluation_columns(section: dict[str, Any]) -> dict[str, float]:
    row = flatten_scores(section.get("scores", {}))
    for hospital, epsilon in section.get("epsilon_after", {}).items():
        row[f"eval_epsilon_after/{hospital}"] = float(epsilon)
    return row


def rows(state: ServerState, release_evaluation: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One dict per completed round; the release's evaluation joins its round's row."""
    out = []
    for record in state.rounds:
        clients = record.get("clients", {})
        row: dict[str, Any] = {"round": record["round"], "evaluation": "", "hospitals": len(clients)}
        epsilons = [float(m["epsilon"]) for m in clients.values() if "epsilon" in m]
        row["epsilon_max"] = max(epsilons) if epsilons else math.nan
        for hospital, metrics in sorted(clients.items()):
            for name in HOSPITAL_FIGURES:
                if name in metrics:
                    row[f"{hospital}/{name}"] = float(metrics[name])
        section = record.get("evaluation")
        if release_evaluation is not None and release_evaluation.get("round") == record["round"]:
            section, kind = release_evaluation, "release"
        else:
            kind = "interim"
        if section is not None:
            row["evaluation"] = kind
            row.update(evaluation_columns(section))
        out.append(row)
    return out


def columns(table: Iterable[dict[str, Any]]) -> list[str]:
    keys = set().union(*(row.keys() for row in table)) if table else set()
    return list(FIRST_COLUMNS) + sorted(keys - set(FIRST_COLUMNS))


def write(path: Path, table: list[dict[str, Any]]) -> Path:
    """Write ``table`` as CSV (missing and NaN cells empty), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(table), restval="")
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    os.replace(tmp, path)
    return path


def read(path: Path) -> list[dict[str, Any]]:
    """metrics.csv back as dicts: numbers as floats (``round`` an int), empty cells left out
    (``evaluation`` is always there, "" when the round was not evaluated)."""
    table = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                if key == "evaluation":
                    row[key] = text or ""
                elif text in ("", None):
                    continue
                elif key == "round":
                    row[key] = int(text)
                else:
                    row[key] = float(text)
            table.append(row)
    return table
