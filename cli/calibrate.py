"""``memprop calibrate``: measure this machine's rates again, on purpose, and print them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memprop_cli.options import console_for, output_path, working


def calibrate_command(
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Replace the cached rates outright (the machine changed); by default "
                        "each figure kept is the best of the new and the cached one.")] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", parser=output_path,
        help="Write the rates as JSON; - is standard output.")] = None,
) -> None:
    """Measure the rates the roofline cost model prices recomputation by (matrix product, copy,
    op launch, selective policy), replace the cached ones and print both.

    Plans read the rates from a cache, measured once per machine: run this on an idle machine
    when the cached ones were measured under load (a busy machine cannot lower them: the best of
    the new and the cached figures is kept), or with --fresh after the machine changed."""
    from dataclasses import asdict

    from memprop.calibration.cache import cache_file
    from memprop.calibration.rates import calibrate
    from memprop.report.json_report import write_json

    console = console_for({"--json": json_path})
    with working(f"measuring {device}"):
        rates, previous = calibrate(device, fresh=fresh)
    console.print(f"{device}: {rates.describe()}", soft_wrap=True)
    if previous is not None:
        console.print(f"before: {previous.describe()}", soft_wrap=True)
    console.print(f"wrote {cache_file()}; pointwise ops are timed again by the next plan",
                  soft_wrap=True)
    if json_path is not None:
        document = {"schema_version": 1, "device": device, "rates": asdict(rates),
                    "previous": None if previous is None else asdict(previous),
                    "cache": str(cache_file())}
        console.print(f"wrote {write_json(json_path, document)}")
