"""The `fedsynth` command: one entry point for coordinators, hospitals and auditors.

    fedsynth run CONFIG              coordinator: run a federation (Simulation Engine)
    fedsynth certs OUT --san HOST    coordinator: CA and SuperLink TLS certificate
    fedsynth enroll DIR              hospital: SuperNode auth key + ledger signing key
    fedsynth client budget DIR       hospital: what its ledger has spent, what remains
    fedsynth client check-data       hospital: what would be read, what is skipped
    fedsynth client deidentify       hospital: de-identified copy of a DICOM tree
    fedsynth audit RELEASE           auditor: verify ledgers and recompute epsilon
    fedsynth report OUTPUT_DIR       anyone: PNG plots of a run's metrics.csv
    fedsynth release R OUT --format dicom  (= release-dicom) synthetic images as DICOM
    fedsynth translate R IN OUT      anyone: apply a released CycleGAN translator to PNGs

Every command validates its input first and exits non-zero with one line naming the
file and the problem.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer

from shared.config import ConfigError, RunConfig, load_toml, validate

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fedsynth: federated, differentially private GANs for medical images.")

def _register_subcommands() -> None:
    from client.commands import app as client_app
    from shared.audit import audit_command

    app.add_typer(client_app, name="client")
    from server.commands import release_dicom, release_export, translate_command

    app.command("release-dicom")(release_dicom)
    app.command("release")(release_export)
    app.command("translate")(translate_command)
    from client.enroll import enroll_command
    from shared.certs import certs_command

    app.command("certs")(certs_command)
    app.command("enroll")(enroll_command)
    app.command("audit")(audit_command)
    from server.report import report_command

    app.command("report")(report_command)


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            fail(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config (flat TOML), e.g. configs/demo.toml.")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override one knob, key=value (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue from the last checkpoint in output-dir.")] = False,
    fresh: Annotated[bool, typer.Option(
        help="Delete output-dir first (its checkpoints, release and simulated ledgers).")] = False,
    verbose: Annotated[bool, typer.Option(help="Show all Flower output.")] = False,
) -> None:
    """Run a federation on Flower's Simulation Engine and print where the release is.

    Starts a private SuperLink on loopback with one simulated hospital (SuperNode) per
    `num-hospitals`, streams round progress, and stops it at the end. Flower's own log
    goes to <output-dir>/flower.log.
    """
    from client.data import DataError
    from server import launch

    try:
        load_toml(config)  # the file on its own: errors name the file
        file_values = tomllib.loads(Path(config).read_text())
        values = validate({**file_values, **_parse_set(set_ or [])}, str(config))
        if resume:
            values["resume"] = True
        values = launch.resolve_paths(values, Path.cwd())
        cfg = RunConfig.from_flat(values, str(config))
        launch.preflight(cfg)
    except (ConfigError, DataError) as e:
        fail(str(e))
    out = Path(cfg.output_dir)
    if fresh and not resume and out.exists():
        shutil.rmtree(out)
    if not cfg.resume and (out / "checkpoints").exists():
        fail(f"{out} holds a previous run: pass --resume to continue it or --fresh to start over")
    typer.echo(f"fedsynth: {cfg.num_hospitals} hospitals, {cfg.num_rounds} rounds, "
               f"target epsilon {cfg.target_epsilon}, output {out}")
    code = launch.simulate(cfg, out, verbose=verbose)
    release = out / "release" / "release.json"
    if code != 0:
        fail(f"flwr run exited with code {code}; see {out / 'flower.log'}", code=1)
    if cfg.stop_after_round and cfg.stop_after_round < cfg.num_rounds:
        typer.echo(f"stopped after round {cfg.stop_after_round}; continue with --resume")
        return
    if not release.exists():
        fail(f"the run ended without a release; see {out / 'flower.log'}", code=1)
    typer.echo(f"done: open {release.parent / 'grid.png'} and {release}")


_register_subcommands()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
