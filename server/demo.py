"""``fedcoreml demo``: the coordinator in this process, a simulated fleet in another, real gRPC.

The fleet is started as ``fedcoreml devices`` in a child process, exactly as an operator would
run it, so the coordinator process never loads TensorFlow and the devices reach it only over
the wire protocol on 127.0.0.1. Every option is checked before anything is written: the run
directory is created only once the coordinator is listening and the fleet is about to start. If
the fleet exits before the run is over, the demo stops and says why instead of waiting for
devices that will never come; if the fleet refused an option, the new directory is removed.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedcoreml.ios_bridge.cli_logging import configure_logging
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.extras import require_devices_extra
from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig, RoundRecord
from fedcoreml.server.run_dir import RunDirectory

FLEET_ERROR_PREFIX = "fedcoreml devices: error: "


class DemoError(FedCoreMLError):
    """A demo option out of range, or a fleet that stopped before the run was over."""


class _FleetExited(BaseException):
    """Raised in the main thread when the fleet process ends while the run still waits on it."""

    def __init__(self, status: int = 0) -> None:
        super().__init__(status)
        self.status = status


def _round_table(records: list[RoundRecord], unit: str = "round") -> Table:
    """One row per round; a fedbuff run's versions show their applied updates' staleness."""
    table = Table(title=f"{unit}s")
    devices = "devices" if unit == "round" else "accepted/sent"
    columns = [unit, "test accuracy", "test loss", devices, "examples", "seconds"]
    if unit == "version":
        columns.append("staleness")
    for column in columns:
        table.add_column(column, justify="right")
    for r in records:
        row = [
            str(r.round),
            f"{r.test_accuracy:.4f}",
            f"{r.test_loss:.4f}",
            f"{r.devices_reported}/{r.devices_sampled}" if r.round else "-",
            f"{r.examples:,}" if r.round else "-",
            f"{r.seconds:.1f}",
        ]
        if unit == "version":
            row.append(" ".join(map(str, r.fedbuff["staleness"])) if r.fedbuff else "-")
        table.add_row(*row)
    return table


def _check(args: argparse.Namespace) -> None:
    require_devices_extra()  # the fleet's process needs it
    if args.devices < 1:
        raise DemoError(f"--devices must be at least 1, got {args.devices}")
    if args.limit is not None and args.limit < 1:
        raise DemoError(f"--limit must be at least 1, got {args.limit}")


# -- the web dashboard (server/dashboard/): on unless --no-dashboard --------------------------
def _start_dashboard(args: argparse.Namespace, coordinator: Coordinator, console: Console):
    """The demo's dashboard, started before the run and its URL printed; None if turned off."""
    if args.dashboard is None:
        return None
    from fedcoreml.server.dashboard import start_dashboard

    dashboard = start_dashboard(coordinator, args.dashboard)
    console.print(f"dashboard: {dashboard.url} (live while the demo runs)")
    return dashboard


def _fleet_command(args: argparse.Namespace, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "fedcoreml.server.cli", "devices",
        "--server", f"127.0.0.1:{port}", "--count", str(args.devices),
        "--partition", args.partition, "--seed", str(args.seed), "--log-level", "info",
    ]  # fmt: skip
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    return command


def _fleet_failure(returncode: int, log_path: Path) -> tuple[str, bool]:
    """Why the fleet stopped, and whether it refused to start (said why in its one-line error)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith(FLEET_ERROR_PREFIX):
            return f"the device fleet refused to start: {line[len(FLEET_ERROR_PREFIX) :]}", True
    return f"the device fleet exited with status {returncode}; see {log_path}", False


def run_demo(
    args: argparse.Namespace,
    make_config: Callable[..., CoordinatorConfig],
) -> int:
    _check(args)
    console = Console(soft_wrap=True)  # piped: no colour codes, no lines cut at 80 columns
    configure_logging(args.log_level, flower=True)
    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    RunDirectory(run_dir).check_new(can_resume=False)
    config = make_config(
        args,
        run_dir=run_dir,
        min_devices=args.devices,
        listen="127.0.0.1:0",
        eval_data=args.data_dir,
        poll_interval_ms=200,
    )

    unit = "version" if config.asynchronous else "round"

    def on_round(record: RoundRecord) -> None:
        if record.round == 0:
            console.print(f"initial model: test accuracy {record.test_accuracy:.4f}")
        elif record.fedbuff is not None:
            console.print(
                f"version {record.round}/{config.rounds}: test accuracy "
                f"{record.test_accuracy:.4f}, loss {record.test_loss:.4f}, "
                f"{record.fedbuff['applied']} updates applied (staleness "
                f"{' '.join(map(str, record.fedbuff['staleness']))}), {record.seconds:.1f} s"
            )
        else:
            console.print(
                f"round {record.round}/{config.rounds}: test accuracy "
                f"{record.test_accuracy:.4f}, loss {record.test_loss:.4f}, "
                f"{record.devices_reported}/{record.devices_sampled} devices, "
                f"{record.seconds:.1f} s"
            )

    coordinator = Coordinator(config, on_round=on_round)  # checks the model, strategy, data
    dashboard = _start_dashboard(args, coordinator, console)
    port = coordinator.start()
    created = not Path(run_dir).exists()
    fleet_log_path = Path(run_dir) / "devices.log"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        console.print(
            f"coordinator on 127.0.0.1:{port}; starting {args.devices} simulated iPhones "
            f"({args.partition}); {config.rounds} {unit}s of {config.strategy}"
        )
        final, fleet_status = _run_with_fleet(coordinator, _fleet_command(args, port),
                                              fleet_log_path, console)  # fmt: skip
    except _FleetExited as exited:
        reason, refused = _fleet_failure(exited.status, fleet_log_path)
        if refused and created:  # nothing federated, and the reason is said: leave no trace
            shutil.rmtree(run_dir, ignore_errors=True)
        raise DemoError(reason) from None
    finally:
        coordinator.stop()
        if dashboard is not None:
            dashboard.stop()
    console.print(_round_table(coordinator.records, unit))
    if fleet_status != 0:
        console.print(f"the device fleet exited with {fleet_status}; see {fleet_log_path}")
        return 1
    last = coordinator.records[-1]
    console.print(
        f"final test accuracy: [bold]{last.test_accuracy:.4f}[/bold] "
        f"({len(coordinator.eval_data.y_test):,} held-out images)"
    )
    console.print(f"final model: {final}")
    console.print(f"run directory: {run_dir}")
    return 0


def _run_with_fleet(
    coordinator: Coordinator, command: list[str], log_path: Path, console: Console
) -> tuple[Path, int]:
    """Start the fleet, run every round, wait for the fleet: (final model, fleet's status)."""
    with open(log_path, "wb") as log:
        fleet = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            final = _federate(coordinator, fleet, console)
        except _FleetExited:
            raise _FleetExited(fleet.wait()) from None
        except BaseException:
            fleet.terminate()  # Ctrl-C or a failed run: the devices have nothing left to do
            raise
        finally:
            coordinator.stop()
            _end(fleet)
    return final, fleet.returncode


def _federate(coordinator: Coordinator, fleet: subprocess.Popen, console: Console) -> Path:
    """Run every round; raises :class:`_FleetExited` if the fleet fails before the run ends."""
    main = threading.main_thread().ident
    final_model = coordinator.federated.run_dir.final_model

    def interrupt(_signum: int, _frame: object) -> None:
        # Once final.mlmodel is written the run is over, and devices may leave.
        if not final_model.exists():
            raise _FleetExited

    # Held while signalling, and while the handler is restored: no signal after that.
    handler_lock = threading.Lock()
    running = threading.Event()

    def watch() -> None:
        # A fleet that exits 0 was told the run is finished.
        if fleet.wait() != 0:
            with handler_lock:
                if running.is_set():
                    # A real signal wakes the main thread from whatever wait it is in.
                    signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    running.set()
    try:
        threading.Thread(target=watch, name="fleet-watch", daemon=True).start()
        with console.status("federating ...", spinner="dots"):
            return coordinator.run()
    finally:
        with handler_lock:
            running.clear()
            signal.signal(signal.SIGUSR1, previous)


def _end(fleet: subprocess.Popen) -> None:
    """Wait for the fleet to hear the run is over and exit; stop it if it does not."""
    try:
        fleet.wait(timeout=60)
    except subprocess.TimeoutExpired:
        fleet.kill()
        fleet.wait()
