"""`fedsynth release-dicom`: a release's synthetic images as DICOM Secondary Capture files.

Reads what `server/release.py` wrote (post-processing only, no privacy cost):

    release/synthetic.npz     train_images uint8 (N, S, S), train_labels (N, 1)
    release/release.json      class names, run id, privacy summary (max epsilon, delta)
    release/generator-ema.pt  the generator the images came from (its SHA-256 is recorded)

and writes `OUT_DIR/synthetic_000000.dcm`, ... through `server.dicom_export`: the stored
pixels are the release's uint8 values unchanged, so each DICOM equals the released PNG.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def release_dicom(
    release_dir: Annotated[Path, typer.Argument(
        help="The release folder (<output-dir>/release) or the run's output-dir.")],
    out_dir: Annotated[Path, typer.Argument(help="New or empty folder for the DICOM files.")],
) -> None:
    """Write a release's synthetic images as DICOM, marked synthetic, with the privacy guarantee.

    One Secondary Capture file per image (fresh UIDs, no patient identity, ImageType
    DERIVED\\SECONDARY, BurnedInAnnotation NO); ImageComments and a FEDSYNTH private block
    carry the class, the generator's SHA-256, the release's (epsilon, delta) and run id.
    """
    import numpy as np

    from server.dicom_export import write_synthetic_dicom

    if not (release_dir / "release.json").exists() and (release_dir / "release" / "release.json").exists():
        release_dir = release_dir / "release"
    meta_path, npz_path = release_dir / "release.json", release_dir / "synthetic.npz"
    for path in (meta_path, npz_path):
        if not path.is_file():
            fail(f"{path}: not found; pass the release folder that `fedsynth run` wrote")
    try:
        meta = json.loads(meta_path.read_text())
        class_names = list(meta["images"]["classes"])
        generator_path = release_dir / meta["images"].get("generator", "generator-ema.pt")
        privacy = meta["privacy"]
        run_id = str(meta["run_id"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{meta_path}: not a fedsynth release.json ({type(e).__name__}: {e})")
    if not generator_path.is_file():
        fail(f"{generator_path}: not found; the images' provenance needs the generator file")
    try:
        with np.load(npz_path) as npz:
            images, labels = npz["train_images"], npz["train_labels"].reshape(-1)
    except (OSError, ValueError, KeyError) as e:
        fail(f"{npz_path}: not a readable synthetic.npz ({e})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        fail(f"{out_dir}: exists and is not an empty folder; choose a new output folder")

    # No hospital ledger means no DP guarantee: record epsilon = inf rather than invent one.
    epsilon = float(privacy.get("max_epsilon") or math.inf)
    delta = float(privacy.get("max_delta") or 0.0)
    generator_sha256 = hashlib.sha256(generator_path.read_bytes()).hexdigest()
    try:
        paths = write_synthetic_dicom(
            images, [int(k) for k in labels], class_names, out_dir,
            generator_sha256=generator_sha256, epsilon=epsilon, delta=delta,
            release_id=run_id[:60],
        )
    except ValueError as e:
        fail(f"{release_dir}: {e}")
    per_class = Counter(class_names[int(k)] for k in labels)
    typer.echo(f"wrote {len(paths)} synthetic DICOM files to {out_dir} "
               f"({', '.join(f'{name} {per_class[name]}' for name in class_names)})")
    typer.echo(f"  (epsilon, delta) = ({epsilon:g}, {delta:g}) per hospital, max over hospitals; "
               f"generator {generator_path.name} SHA-256 {generator_sha256[:16]}...")
    if math.isinf(epsilon):
        typer.secho("  warning: the release has no privacy ledger; epsilon recorded as inf",
                    fg=typer.colors.YELLOW)


FORMATS = ("dicom",)


def release_export(
    release_dir: Annotated[Path, typer.Argument(
        help="The release folder (<output-dir>/release) or the run's output-dir.")],
    out_dir: Annotated[Path, typer.Argument(help="New or empty folder for the exported files.")],
    format_: Annotated[str, typer.Option(
        "--format", help="dicom: Secondary Capture files (the release already holds PNG and .npz).")
    ] = "dicom",
) -> None:
    """Export a release's synthetic images in another format (same as release-dicom)."""
    if format_ not in FORMATS:
        fail(f"--format {format_!r}: one of {', '.join(FORMATS)} (PNG and .npz are in the release)")
    release_dicom(release_dir, out_dir)


def translate_command(
    release_dir: Annotated[Path, typer.Argument(
        help="A CycleGAN release folder (<output-dir>/release) or the run's output-dir.")],
    in_dir: Annotated[Path, typer.Argument(help="Folder of PNG images of the source domain.")],
    out_dir: Annotated[Path, typer.Argument(help="New or empty folder for the translations.")],
    to: Annotated[str, typer.Option(
        help="Target domain: a class name of the release (default: its domain B).")] = "",
) -> None:
    """Translate a folder of PNG images with a released CycleGAN translator.

    Each *.png in IN_DIR (grayscale; other modes are converted) is resized and padded to the
    release's image size exactly as training preprocesses scans, translated into the target
    domain, and written to OUT_DIR under the same name, 8-bit grayscale at that size.
    Post-processing of a DP release: no privacy cost.
    """
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from client.data import preprocess_images
    from shared import cyclegan
    from shared.config import ConfigError, RunConfig

    if not (release_dir / "release.json").exists() and (release_dir / "release" / "release.json").exists():
        release_dir = release_dir / "release"
    meta_path = release_dir / "release.json"
    if not meta_path.is_file():
        fail(f"{meta_path}: not found; pass the release folder that `fedsynth run` wrote")
    try:
        meta = json.loads(meta_path.read_text())
        cfg = RunConfig.from_flat(meta["config"], str(meta_path))
        images_info = meta["images"]
    except (ValueError, KeyError, TypeError, ConfigError) as e:
        fail(f"{meta_path}: not a fedsynth release.json ({type(e).__name__}: {e})")
    if cfg.model != "cyclegan":
        fail(f"{meta_path}: a {cfg.model} release has no translator; translate needs a "
             "model = 'cyclegan' release")
    a, b = cfg.class_names
    target = to or b
    if target not in (a, b):
        fail(f"--to {target!r}: not a domain of this release (domains: {a}, {b})")
    direction = "a-to-b" if target == b else "b-to-a"
    weights_path = release_dir / images_info["translators"][direction]
    if not weights_path.is_file():
        fail(f"{weights_path}: not found; the release is incomplete")
    if not in_dir.is_dir():
        fail(f"{in_dir}: not a folder of PNG images")
    pngs = sorted(p for p in in_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not pngs:
        fail(f"{in_dir}: no .png files in it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        fail(f"{out_dir}: exists and is not an empty folder; choose a new output folder")

    arrays = []
    for path in pngs:
        try:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
        except (OSError, UnidentifiedImageError) as e:
            fail(f"{path}: not a readable PNG image ({e})")
    translator = cyclegan.Translator(cfg.g_width)
    try:
        translator.load_state_dict(torch.load(weights_path, weights_only=True))
    except (RuntimeError, OSError, ValueError) as e:
        fail(f"{weights_path}: does not fit this release's translator ({e})")
    x = preprocess_images(arrays, cfg)
    with torch.no_grad():
        translated = cyclegan.to_uint8(translator.eval()(x))
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, image in zip(pngs, translated):
        Image.fromarray(image).save(out_dir / path.name)
    typer.echo(f"translated {len(pngs)} images {a if direction == 'a-to-b' else b} -> {target} "
               f"into {out_dir} ({cfg.image_size}x{cfg.image_size})")
