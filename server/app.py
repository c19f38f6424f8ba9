"""The coordinator's Flower ServerApp: validate the run config, then run the federation."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server import federation
from shared.config import RunConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(dict(context.run_config), "run config")
    federation.run(grid, cfg)
