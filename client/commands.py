"""`fedsynth client ...`: what a hospital runs on its own node (nothing here talks to the server)."""

from __future__ import annotations

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
    epsilon: Annotated[Optional[float], typer.Option(help="The node's epsilon budget.")] = None,
) -> None:
    """Show what this node's privacy ledger has spent, entry by entry."""
    from client.ledger import Ledger, LedgerError

    if not (state_dir / "ledger.jsonl").exists():
        fail(f"{state_dir}: no ledger.jsonl (this node has not trained yet)")
    try:
        entries = Ledger(state_dir, "?").entries
    except LedgerError as e:
        fail(str(e), code=1)
    for e in entries:
        typer.echo(f"{e['time']}  run {e['run_id'][:8]}  round {e['round']:>3}  "
                   f"{e['mechanism']:<20} sigma {e['noise_multiplier']:.3f}  "
                   f"q {e['sample_rate']:.4f}  steps {e['steps']:>4}  "
                   f"epsilon {e['epsilon']:.3f}  (delta {e['delta']:.1e})")
    spent = entries[-1]["epsilon"] if entries else 0.0
    budget = epsilon if epsilon is not None else (entries[-1]["budget_epsilon"] if entries else None)
    typer.echo(f"spent: epsilon {spent:.3f}" + (f" of {budget}" if budget else ""))
