"""`fedsynth client ...`: what a hospital runs on its own node (nothing here talks to the server)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Commands a hospital runs on its own node.")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command("budget")
def client_budget(
    state_dir: Annotated[Path, typer.Argument(help="The node's state directory.")],
    epsilon: Annotated[Optional[float], typer.Option(
        help="The node's epsilon budget (default: the one its last entry was made under).")] = None,
) -> None:
    """Show what this node's privacy ledger has spent, entry by entry, and what remains.

    Reads the ledger and checks its hash chain and signatures with the node's public
    key; writes nothing. Exits 1 if the ledger does not verify, 2 if there is none.
    """
    from client.ledger import (LEDGER_FILE, PUBLIC_KEY, LedgerError, load_public_key,
                               read_entries, verify_chain)

    path = state_dir / LEDGER_FILE
    if not path.exists():
        fail(f"{state_dir}: no {LEDGER_FILE} (this node has not trained yet)")
    try:
        entries = read_entries(path)
        problems = verify_chain(entries, load_public_key(state_dir / PUBLIC_KEY), str(path))
    except LedgerError as e:
        fail(str(e), code=1)
    if problems:
        fail(f"{problems[0]} ({len(problems)} problems in all; the node will not train on it)",
             code=1)
    for e in entries:
        typer.echo(f"{e['time']}  run {e['run_id'][:8]}  round {e['round']:>3}  "
                   f"{e['mechanism']:<20} sigma {e['noise_multiplier']:.3f}  "
                   f"q {e['sample_rate']:.4f}  steps {e['steps']:>4}  "
                   f"epsilon {e['epsilon']:.3f}  (delta {e['delta']:.1e})")
    spent = entries[-1]["epsilon"] if entries else 0.0
    budget = epsilon if epsilon is not None else (entries[-1]["budget_epsilon"] if entries else None)
    if budget is None:
        typer.echo(f"spent: epsilon {spent:.3f}")
        return
    delta = f" at delta {entries[-1]['delta']:.1e}" if entries else ""
    typer.echo(f"spent: epsilon {spent:.3f} of {budget:g}{delta}; "
               f"remaining: {max(0.0, budget - spent):.3f}")


@app.command("check-data")
def check_data(
    node_config: Annotated[Optional[str], typer.Option(
        help="The SuperNode's --node-config, in Flower's format, e.g. "
             "\"data-path='/scans' state-dir='/var/fedsynth' label-from='subfolder'\".")] = None,
    data_path: Annotated[Optional[Path], typer.Option(help="Folder of scans or .npz file.")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(
        help="The node's state directory (the preprocessing cache and the preview go there).")] = None,
    data_format: Annotated[Optional[str], typer.Option(help="auto, dicom, png or nifti.")] = None,
    label_from: Annotated[Optional[str], typer.Option(
        help="subfolder, csv, dicom-attribute or none.")] = None,
    label_manifest: Annotated[Optional[Path], typer.Option(
        help="CSV with file,label or SOPInstanceUID,label (here: relative to the current "
             "folder; in --node-config: relative to data-path).")] = None,
    label_attribute: Annotated[Optional[str], typer.Option(
        help="DICOM keyword for label-from=dicom-attribute, e.g. BodyPartExamined.")] = None,
    nifti_axis: Annotated[Optional[int], typer.Option(help="NIfTI slicing axis: 0, 1 or 2.")] = None,
    window_center: Annotated[Optional[float], typer.Option(help="CT window center, HU.")] = None,
    window_width: Annotated[Optional[float], typer.Option(help="CT window width, HU.")] = None,
    min_size: Annotated[Optional[int], typer.Option(help="Smallest side kept, pixels.")] = None,
    run_config: Annotated[Optional[Path], typer.Option(
        help="The federation's run config (TOML); image-size and class-names come from it.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Training image size (28, 32 or 64).")] = None,
    class_names: Annotated[Optional[str], typer.Option(
        help="The federation's public class names, comma-separated, in label order.")] = None,
    preview: Annotated[Optional[Path], typer.Option(
        help="Preview grid PNG to write (default: <state-dir>/check-data-preview.png).")] = None,
    per_class: Annotated[int, typer.Option(help="Preview images per class (one row each).")] = 8,
) -> None:
    """Show what training would read from this node's data, with the loader training uses.

    Counts per class and modality, image sizes, one line per skipped file (path relative
    to the data folder, and why), and a preview grid of preprocessed images (patient
    pixels: it stays on the node). Exits 1 if nothing usable remains, 2 on a bad setting.
    Options given one by one override the same keys of --node-config.
    """
    from flwr.common.config import parse_config_args

    from client.data import DataError, NoUsableData, load_hospital
    from client.node import Hospital
    from shared.config import ConfigError, RunConfig, load_toml

    try:
        values = parse_config_args([node_config]) if node_config else {}
    except Exception as e:  # noqa: BLE001 -- Flower raises click errors for bad strings
        fail(f"--node-config: {getattr(e, 'message', e)}")
    options = {
        "data-path": data_path, "state-dir": state_dir, "data-format": data_format,
        "label-from": label_from, "label-manifest": label_manifest,
        "label-attribute": label_attribute, "nifti-axis": nifti_axis,
        "window-center": window_center, "window-width": window_width, "min-size": min_size,
    }
    values.update({key: str(value.resolve()) if isinstance(value, Path) else value
                   for key, value in options.items() if value is not None})
    values.setdefault("epsilon", float("inf"))  # the budget plays no part in reading data
    try:
        flat = dict(load_toml(run_config)) if run_config else {}
        if image_size is not None:
            flat["image-size"] = image_size
        if class_names is not None:
            flat["class-names"] = class_names
        cfg = RunConfig.from_flat(flat, str(run_config or "options"))
        hospital = Hospital.from_node_config(values, cfg)
    except ConfigError as e:
        fail(str(e))

    source = hospital.source
    kind = "folder" if hospital.data_path.is_dir() else "file"
    how = (f"; format {source.format}, labels from {source.label_from}" if kind == "folder" else "")
    typer.echo(f"data: {hospital.data_path} ({kind}{how})")
    typer.echo(f"classes: {', '.join(cfg.class_names)}; image size {cfg.image_size}")
    try:
        data = load_hospital(hospital, cfg)
    except NoUsableData as e:
        _print_skipped(e.skipped)
        fail(str(e), code=1)
    except DataError as e:
        fail(str(e), code=1)

    typer.echo(f"usable images: {len(data)}" + (f" (preprocessing cache: {data.cache})"
                                                  if data.cache else ""))
    _print_counts(data, cfg.class_names)
    sizes = Counter(f"{h}x{w}" for h, w in data.sizes)
    typer.echo("sizes before resizing: "
               + ", ".join(f"{size} ({n})" for size, n in sizes.most_common()))
    _print_skipped(data.skipped)
    if run_config is not None:
        from client.train import sample_rate
        from shared.models import family

        problem = family(cfg).data_problem(data.labels.numpy(), cfg.class_names)
        if problem:
            fail(f"{hospital.data_path}: {problem} (model = {cfg.model!r})", code=1)

        q = sample_rate(cfg, len(data))
        typer.echo(f"DP sampling: batch-size {cfg.batch_size} of {len(data)} images, "
                   f"sample rate q = {q:.4g}" + (" (every step sees all images)" if q >= 1 else ""))
    path = preview or hospital.state_dir / "check-data-preview.png"
    _write_preview(data, cfg.num_classes, per_class, path)
    typer.echo(f"preview: {path}")


def _print_counts(data, class_names) -> None:
    modalities = sorted(set(data.modalities))
    counts = Counter(zip(data.labels.tolist(), data.modalities))
    width = max(len(name) for name in [*class_names, "class"])
    typer.echo(f"  {'class':<{width}}  " + "  ".join(f"{m:>8}" for m in modalities)
               + f"  {'total':>8}")
    for k, name in enumerate(class_names):
        row = [counts[(k, m)] for m in modalities]
        note = "  <- no images" if sum(row) == 0 else ""
        typer.echo(f"  {name:<{width}}  " + "  ".join(f"{n:>8}" for n in row)
                   + f"  {sum(row):>8}{note}")


def _print_skipped(skipped) -> None:
    if not skipped:
        typer.echo("skipped: none")
        return
    by_reason = Counter(s.reason for s in skipped)
    typer.echo(f"skipped {len(skipped)} files: "
               + ", ".join(f"{n} {reason}" for reason, n in by_reason.most_common()))
    for s in skipped:
        typer.echo(f"  {s.path}: {s.reason}")


def _write_preview(data, num_classes: int, per_class: int, path: Path, scale: int = 3) -> None:
    """One row per class, up to `per_class` preprocessed images each, gray gaps between."""
    import numpy as np
    from PIL import Image

    size, pad = data.images.shape[-1], 2
    canvas = np.full((num_classes * (size + pad) + pad, per_class * (size + pad) + pad), 96,
                     np.uint8)
    pixels = ((data.images[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    for k in range(num_classes):
        for col, i in enumerate((data.labels == k).nonzero().flatten()[:per_class].tolist()):
            top, left = pad + k * (size + pad), pad + col * (size + pad)
            canvas[top:top + size, left:left + size] = pixels[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)  # patient pixels: readable by the node's owner only
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                   Image.NEAREST).save(path)


@app.command("deidentify")
def deidentify(
    src: Annotated[Path, typer.Argument(help="Folder of DICOM files (read only).")],
    dst: Annotated[Path, typer.Argument(help="New or empty folder for the de-identified copy.")],
    salt_file: Annotated[Optional[Path], typer.Option(
        help="Secret behind the UID and Patient ID pseudonyms, to keep them stable across "
             "runs; created (32 random bytes, mode 0600) if missing. Default: a fresh "
             "secret per run, never written.")] = None,
) -> None:
    """Copy SRC's DICOM files to DST with the PS3.15 Annex E Basic Profile applied.

    Identifying attributes are removed or emptied, UIDs remapped consistently, private
    tags removed, PatientIdentityRemoved=YES and DeidentificationMethod set. Files that
    are not DICOM, DICOMDIR files and files declaring burned-in annotation are not
    copied. File and folder names are copied as they are.
    """
    import os
    import secrets

    from client.deidentify import deidentify_tree

    if not src.is_dir():
        fail(f"{src}: not a folder; pass the folder holding the DICOM files")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        fail(f"{dst}: exists and is not an empty folder; choose a new output folder")
    salt = None
    if salt_file is not None:
        if not salt_file.exists():
            salt_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        salt = salt_file.read_bytes()
        if len(salt) < 16:
            fail(f"{salt_file}: {len(salt)} bytes; a salt needs at least 16 random bytes")
    try:
        report = deidentify_tree(src, dst, salt=salt)
    except (OSError, ValueError) as e:
        fail(str(e))
    typer.echo(f"de-identified {report.files_written} files into {dst} "
               "(PS3.15 Annex E Basic Application Level Confidentiality Profile)")
    typer.echo(f"  attributes removed {report.elements_removed}, replaced "
               f"{report.elements_replaced}, private removed {report.private_elements_removed}; "
               f"UIDs remapped {report.uids_remapped}")
    if report.skipped:
        typer.echo("  not copied: " + ", ".join(
            f"{n} {reason}" for reason, n in report.skipped.most_common()))
    typer.echo("  file and folder names were copied as they are: check that none holds "
               "a name, ID or date")
    if report.files_written == 0:
        fail(f"{src}: no DICOM file could be de-identified", code=1)
