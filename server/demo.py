"""``fedcoreml demo``: the coordinator in this process, a simulated fleet in another, real gRPC.

The fleet is started as ``fedcoreml devices`` in a child process, exactly as an operator would
run it, so the coordinator process never loads TensorFlow and the devices reach it only over
the wire protocol on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig, RoundRecord


def _round_table(records: list[RoundRecord]) -> Table:
    table = Table(title="rounds")
    for column in ("round", "test accuracy", "test loss", "devices", "examples", "seconds"):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            str(r.round),
            f"{r.test_accuracy:.4f}",
            f"{r.test_loss:.4f}",
            f"{r.devices_reported}/{r.devices_sampled}" if r.round else "-",
            f"{r.examples:,}" if r.round else "-",
            f"{r.seconds:.1f}",
        )
    return table


def run_demo(
    args: argparse.Namespace,
    make_config: Callable[..., CoordinatorConfig],
) -> int:
    console = Console()
    logging.basicConfig(level=logging.WARNING, force=True)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the table below says it all
    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    config = make_config(
        args,
        run_dir=run_dir,
        min_devices=args.devices,
        listen="127.0.0.1:0",
        eval_data=args.data_dir,
        poll_interval_ms=200,
    )

    def on_round(record: RoundRecord) -> None:
        if record.round == 0:
            console.print(f"initial model: test accuracy {record.test_accuracy:.4f}")
        else:
            console.print(
                f"round {record.round}/{config.rounds}: test accuracy "
                f"{record.test_accuracy:.4f}, loss {record.test_loss:.4f}, "
                f"{record.devices_reported}/{record.devices_sampled} devices, "
                f"{record.seconds:.1f} s"
            )

    coordinator = Coordinator(config, on_round=on_round)
    port = coordinator.start()
    fleet_cmd = [
        sys.executable, "-m", "fedcoreml.server.cli", "devices",
        "--server", f"127.0.0.1:{port}", "--count", str(args.devices),
        "--partition", args.partition, "--seed", str(args.seed),
    ]  # fmt: skip
    if args.data_dir:
        fleet_cmd += ["--data-dir", str(args.data_dir)]
    console.print(
        f"coordinator on 127.0.0.1:{port}; starting {args.devices} simulated iPhones "
        f"({args.partition}); {config.rounds} rounds of {config.strategy}"
    )
    fleet_log_path = Path(config.run_dir) / "devices.log"
    with open(fleet_log_path, "wb") as fleet_log:
        fleet = subprocess.Popen(fleet_cmd, stdout=fleet_log, stderr=subprocess.STDOUT)
        try:
            with console.status("federating ...", spinner="dots"):
                final = coordinator.run()
        finally:
            coordinator.stop()
            try:
                fleet.wait(timeout=60)
            except subprocess.TimeoutExpired:
                fleet.kill()
                fleet.wait()
    console.print(_round_table(coordinator.records))
    if fleet.returncode != 0:
        console.print(
            f"[red]the device fleet exited with {fleet.returncode}[/red]; see {fleet_log_path}"
        )
        return 1
    last = coordinator.records[-1]
    console.print(
        f"final test accuracy: [bold]{last.test_accuracy:.4f}[/bold] "
        f"({len(coordinator.eval_data.y_test):,} held-out images)"
    )
    console.print(f"final model: {final}")
    console.print(f"run directory: {run_dir}")
    return 0
