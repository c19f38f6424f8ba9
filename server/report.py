"""`fedsynth report OUTPUT_DIR`: PNG plots of a run from its metrics.csv.

    read <output-dir>/metrics.csv (server/round_metrics.py); without it, rebuild the rows
        from the newest checkpoint's state.json (and release/release.json's evaluation)
    series: per figure, one (rounds, values) line per hospital, class or score
    draw each figure with matplotlib (Agg: no display needed) into <output-dir>/report/
        fid.png          DP FID vs round (every evaluation: eval-every and the release)
        fid-per-class.png  DP FID of each class vs round
        epsilon.png      each hospital's epsilon vs round (after training; after evaluating)
                         and its budget
        losses.png       each hospital's generator loss and discriminator loss on
                         generated images vs round
        scores.png       recall, train-on-synthetic accuracy and AUC, diversity SSIM,
                         classifier score vs round
        memorization.png the release's memorization check (from release/release.json): the
                         share of training vs held-out images per distance to the nearest
                         synthetic image

Everything plotted is already in metrics.csv: post-processing, no privacy cost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from server import checkpoint, round_metrics
from server.checkpoint import CheckpointError

Series = dict[str, tuple[list[int], list[float]]]


class ReportError(ValueError):
    """The output directory has nothing to report on."""


def load_table(output_dir: Path) -> list[dict[str, Any]]:
    """metrics.csv of a run, or its rows rebuilt from the newest checkpoint."""
    output_dir = Path(output_dir)
    path = output_dir / round_metrics.FILENAME
    if path.is_file():
        return round_metrics.read(path)
    newest = checkpoint.latest(output_dir)
    if newest is None:
        raise ReportError(f"{output_dir}: no {round_metrics.FILENAME} and no checkpoint: "
                          "pass the output-dir of a run")
    try:
        state, _, _ = checkpoint.load(newest)
    except CheckpointError as e:
        raise ReportError(str(e)) from None
    release = output_dir / "release" / "release.json"
    evaluation = json.loads(release.read_text()).get("evaluation") if release.is_file() else None
    return round_metrics.rows(state, evaluation)


def series(table: list[dict[str, Any]], column: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows that have ``column``."""
    rows = [row for row in table if column in row]
    return [int(row["round"]) for row in rows], [float(row[column]) for row in rows]


def _columns(table: list[dict[str, Any]]) -> set[str]:
    return set().union(*(row.keys() for row in table)) if table else set()


def _hospitals(table: list[dict[str, Any]]) -> list[str]:
    return sorted({c.split("/", 1)[0] for c in _columns(table) if c.endswith("/epsilon")})


def figures(table: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What each PNG shows: file name -> {title, ylabel, panels: [(panel title, Series)]}."""
    columns = _columns(table)
    hospitals = _hospitals(table)
    classes = sorted({c.split(".")[1] for c in columns
                      if c.startswith("fid_per_class.") and c.count(".") == 1})
    out: dict[str, dict[str, Any]] = {}
    if "fid" in columns:
        out["fid.png"] = {"title": "DP FID vs round", "ylabel": "FID (release's feature subspace)",
                          "panels": [("all classes", {"FID": series(table, "fid")})]}
    if classes:
        out["fid-per-class.png"] = {
            "title": "DP FID per class vs round", "ylabel": "FID",
            "panels": [("per class", {c: series(table, f"fid_per_class.{c}") for c in classes})]}
    epsilon: Series = {}
    for h in hospitals:
        epsilon[f"{h} (trained)"] = series(table, f"{h}/epsilon")
        if f"eval_epsilon_after/{h}" in columns:
            epsilon[f"{h} (evaluated)"] = series(table, f"eval_epsilon_after/{h}")
        if f"{h}/budget-epsilon" in columns:
            epsilon[f"{h} budget"] = series(table, f"{h}/budget-epsilon")
    if epsilon:
        out["epsilon.png"] = {"title": "Privacy spent vs round", "ylabel": "epsilon",
                              "panels": [("per hospital", epsilon)]}
    losses = [(name, {h: series(table, f"{h}/{name}") for h in hospitals if f"{h}/{name}" in columns})
              for name in ("g-loss", "d-loss-fake")]
    losses = [(name, s) for name, s in losses if s]
    if losses:
        out["losses.png"] = {"title": "Losses on generated images vs round", "ylabel": "loss",
                             "panels": losses}
    scores = {name: series(table, column) for name, column in (
        ("recall", "recall"), ("TSTR accuracy", "train_on_synthetic.accuracy"),
        ("TSTR AUC", "train_on_synthetic.auc"), ("classifier score", "classifier_score"))
        if column in columns}
    scores.update({f"diversity SSIM {c}": series(table, f"diversity_ssim.per_class.{c}")
                   for c in sorted({col.rsplit(".", 1)[1] for col in columns
                                    if col.startswith("diversity_ssim.per_class.")})})
    if scores:
        out["scores.png"] = {"title": "Other scores vs round", "ylabel": "score",
                             "panels": [("scores", scores)]}
    return out


def draw(spec: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = spec["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, (rounds, values) in lines.items():
            style = "--" if label.endswith("budget") else "-o"
            ax.plot(rounds, values, style, label=label, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(spec["ylabel"] if title == panels[0][0] else title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(spec["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def memorization_shares(check: dict[str, Any]) -> dict[str, list[float]]:
    """release.json's memorization histograms as shares of their (noised) totals, negative
    noisy counts shown as 0."""
    out = {}
    for part in ("train", "holdout"):
        counts = [max(c, 0.0) for c in check[f"{part}_histogram"]]
        total = sum(counts) or 1.0
        out[part] = [c / total for c in counts]
    return out


def draw_memorization(check: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = check["bin_edges"]
    shares = memorization_shares(check)
    width = edges[1] - edges[0]
    left = edges[:-1] + [edges[-1]]                      # the last bar is the overflow bin
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([x + 0.05 * width for x in left], shares["train"], width=0.45 * width, align="edge",
           label="training images")
    ax.bar([x + 0.5 * width for x in left], shares["holdout"], width=0.45 * width, align="edge",
           label="held-out images")
    ax.set_xlabel(f"distance to the nearest synthetic image (last bar: >= {edges[-1]:.3g})")
    ax.set_ylabel("share of images (DP)")
    verdict = "FLAGGED: training images closer" if check["flagged"] else "not flagged"
    ax.set_title(f"Memorization check: {verdict}\nP(training image closer than held-out) = "
                 f"{check['closer_probability']:.3f} +- {check['standard_error']:.3f}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(output_dir: Path, out: Path | None = None) -> list[Path]:
    """Draw every figure the run's metrics allow; returns the PNG paths."""
    table = load_table(output_dir)
    if not table:
        raise ReportError(f"{output_dir}: {round_metrics.FILENAME} has no rounds yet")
    out = Path(out) if out is not None else Path(output_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = [draw(spec, out / name) for name, spec in figures(table).items()]
    release = Path(output_dir) / "release" / "release.json"
    if release.is_file():
        check = json.loads(release.read_text()).get("evaluation", {}).get("scores", {}).get("memorization")
        if check is not None:
            paths.append(draw_memorization(check, out / "memorization.png"))
    return paths


def report_command(
    output_dir: Annotated[Path, typer.Argument(help="A run's output-dir (holds metrics.csv, checkpoints/).")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write the PNGs (default OUTPUT_DIR/report).")] = None,
) -> None:
    """Plot a run: FID, per-class FID, epsilon, losses, other scores vs round; memorization (PNG).

    Reads OUTPUT_DIR/metrics.csv (written after every round; rebuilt from the newest
    checkpoint when missing) and, for the memorization check, OUTPUT_DIR/release/release.json.
    FID points exist for the rounds the run evaluated (eval-every, and the release). Costs no
    privacy: it plots released figures only.
    """
    from shared.cli import fail

    try:
        paths = write_report(output_dir, out)
    except ReportError as e:
        fail(str(e))
    for path in paths:
        typer.echo(str(path))
