"""``fedcoreml server`` (the coordinator) and ``fedcoreml demo`` (coordinator + simulated fleet)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fedcoreml.ios_bridge.cli_logging import add_logging_options, configure_logging
from fedcoreml.server.gateway.auth import DEFAULT_RATE_PER_S
from fedcoreml.server.stop_signals import StopRequested, stop_signals
from fedcoreml.server.strategies import STRATEGY_NAMES


def _add_run_options(parser: argparse.ArgumentParser, *, demo: bool) -> None:
    parser.add_argument(
        "--rounds",
        type=int,
        help="federated rounds to run" + (" (default 5)" if demo else " (required)"),
    )
    parser.add_argument(
        "--strategy",
        default="fedavg",
        help=f"a Flower strategy: {', '.join(STRATEGY_NAMES)} (default fedavg); fedbuff is "
        "asynchronous: see --versions, --concurrency, --buffer",
    )
    parser.add_argument(
        "--strategy-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for the strategy's constructor, e.g. server_momentum=0.9 (repeatable)",
    )
    parser.add_argument("--fraction", type=float, default=1.0, help="share of devices per round")
    parser.add_argument(
        "--fraction-evaluate",
        type=float,
        default=0.0,
        help="share of devices asked to evaluate each new model on their own data (default 0)",
    )
    parser.add_argument("--model", type=Path, help="updatable .mlmodel (default: the LeNet)")
    defaults = {"epochs": 1, "batch": 32, "lr": 1e-3} if demo else {}
    model_default = " (default: the model's)" if not demo else ""
    parser.add_argument(
        "--local-epochs",
        type=int,
        default=defaults.get("epochs"),
        help=f"epochs per round on each device{model_default or ' (default 1)'}",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.get("batch"),
        help=f"device mini-batch size{model_default or ' (default 32)'}",
    )
    parser.add_argument(
        "--lr", type=float, default=defaults.get("lr"),
        help=f"device learning rate{model_default or ' (default 0.001)'}",
    )  # fmt: skip
    parser.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds before a round closes"
    )
    parser.add_argument(
        "--over-selection",
        type=float,
        default=1.0,
        help="ask this many times the devices needed (e.g. 1.3) and close the round as soon as "
        "the needed number reported",
    )
    parser.add_argument(
        "--min-reports",
        type=int,
        default=1,
        help="a round with fewer reports is abandoned and sent again (up to 3 attempts)",
    )
    group = parser.add_argument_group("asynchronous runs (--strategy fedbuff)")
    _add_fedbuff_options(group, demo=demo)


def _add_fedbuff_options(group: argparse._ArgumentGroup, *, demo: bool) -> None:
    group.add_argument(
        "--versions",
        type=int,
        help="model versions to publish, instead of --rounds" + (" (default 5)" if demo else ""),
    )
    group.add_argument(
        "--concurrency",
        type=int,
        metavar="C",
        help="devices training at once, each on the newest version (default --min-devices)",
    )
    group.add_argument(
        "--buffer",
        type=int,
        metavar="K",
        help="accepted updates per version: their staleness-discounted mean is one server step "
        "(default min(5, C))",
    )
    group.add_argument(
        "--max-staleness",
        type=int,
        default=10,
        help="refuse an update trained on a version this many versions behind the newest or "
        "more (default 10); discount: --strategy-arg staleness_exponent=0.5, i.e. 1/sqrt(1+s)",
    )
    group.add_argument(
        "--target-accuracy",
        type=float,
        metavar="ACC",
        help="end the run once a version is judged at least this accurate on the held-out set",
    )
    group.add_argument(
        "--keep-updates",
        action="store_true",
        help="keep every applied update under RUN_DIR/updates, so `fedcoreml replay` can "
        "rebuild each version bit for bit",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    server = subparsers.add_parser(
        "server",
        help="run the coordinator: serve devices over gRPC and run federated rounds",
        description="Wait for --min-devices devices, run --rounds rounds with a Flower strategy, "
        "then tell the devices the run is finished. Writes run.json, metrics.jsonl, "
        "models/round-NNNN.mlmodel and final.mlmodel into --run-dir.",
    )
    server.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="where devices connect (default 127.0.0.1:50051; 0.0.0.0:PORT for every network "
        "interface; port 0: any free port, logged at start)",
    )
    server.add_argument("--run-dir", type=Path, help="where the run is recorded (required)")
    server.add_argument("--min-devices", type=int, help="devices to wait for (required)")
    server.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run recorded in RUN_DIR after its last completed round, with the "
        "configuration it was started with (only --listen may change)",
    )
    _add_run_options(server, demo=False)
    server.add_argument(
        "--eval-data-dir",
        help="held-out data for the server's evaluation (default: the bundled sample)",
    )
    server.add_argument("--session-ttl", type=float, default=30.0, help="idle device timeout, s")
    server.add_argument("--tls-cert", type=Path, help="PEM certificate for the device port")
    server.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    server.add_argument(
        "--insecure",
        action="store_true",
        help="serve devices over plaintext gRPC (needed when no --tls-cert is given)",
    )
    server.add_argument(
        "--require-tokens",
        action="store_true",
        help="refuse devices without a valid token from RUN_DIR/tokens.json (see fedcoreml tokens)",
    )
    server.add_argument(
        "--rate-limit",
        type=float,
        default=DEFAULT_RATE_PER_S,
        help="calls per second per device (with tokens)",
    )
    server.add_argument(
        "--poll-interval-ms",
        type=int,
        default=500,
        help="retry-after told to idle devices; raise it for large fleets (default 500)",
    )
    server.add_argument(
        "--long-poll-ms",
        type=int,
        default=2000,
        help="how long GetTask may wait for work before answering 'wait' (0: never wait)",
    )
    server.add_argument(
        "--handout-rate",
        type=float,
        default=250.0,
        metavar="TASKS_PER_S",
        help="hand tasks out at most this many per second, each device at a slot of its own, "
        "so a large fleet's downloads do not all start at once (default 250; 0: no limit)",
    )
    server.add_argument(
        "--linger",
        action="store_true",
        help="after the last round, keep answering devices that the run is finished (with the "
        "final model) until stopped (SIGTERM/Ctrl-C), instead of exiting: for phones that come "
        "back later, and for service managers that restart a process that exits",
    )
    server.add_argument(
        "--hold-updates",
        action="store_true",
        help="keep every update until the round closes, even for strategies that only need "
        "their running mean (FedAvg family); costs one model's memory per device",
    )
    server.add_argument(
        "--require-charging",
        action="store_true",
        help="sample and hand tasks only to devices that report they are charging",
    )
    server.add_argument(
        "--require-unmetered",
        action="store_true",
        help="sample and hand tasks only to devices that report an unmetered network (Wi-Fi)",
    )
    server.add_argument(
        "--min-battery",
        type=float,
        metavar="LEVEL",
        help="sample and hand tasks only to devices reporting at least this battery level, "
        "0..1 (a device whose level is unknown is not eligible)",
    )
    # -- the web dashboard (server/dashboard/) --
    server.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        help="serve the read-only web dashboard (run, fleet, models, try a digit) here, e.g. "
        "127.0.0.1:8080 (port 0: any free port; the URL is printed); beyond loopback it needs a "
        "dashboard token: fedcoreml tokens create --run-dir RUN_DIR --dashboard",
    )
    add_logging_options(server, default="info")
    server.set_defaults(handler=_server)

    replay = subparsers.add_parser(
        "replay",
        help="rebuild every version of a fedbuff run from the updates it applied, bit for bit",
        description="Start from the run's committed version 0, apply each version's recorded "
        "updates (kept with --keep-updates) with the run's server step, and check every rebuilt "
        ".mlmodel against the sha256 the run committed. Exit status 1 at the first difference.",
    )
    replay.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a fedbuff run directory")
    replay.set_defaults(handler=_replay)

    demo = subparsers.add_parser(
        "demo",
        help="federate on this machine: coordinator + simulated iPhones over real gRPC",
        description="Start the coordinator on 127.0.0.1 and a fleet of simulated iPhones "
        "(`fedcoreml devices`, a separate process) that train the model with the Core ML "
        "emulator on their own partitions of the data, over the same protocol an iOS app uses.",
    )
    demo.add_argument(
        "--devices", type=int, default=10, metavar="N", help="simulated iPhones (default 10)"
    )
    demo.add_argument("--data-dir", help="training/test data (default: the bundled MNIST sample)")
    demo.add_argument("--partition", default="iid", help="iid, dirichlet:ALPHA or shards:K")
    demo.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="the devices share a random subset of N training examples (default: all)",
    )
    demo.add_argument(
        "--run-dir", type=Path, help="where the run is recorded (default: runs/demo-<time>)"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed for the devices' data and behaviour (default 0)"
    )
    _add_run_options(demo, demo=True)
    # -- the web dashboard (server/dashboard/): on by default in the demo --
    demo.add_argument(
        "--dashboard",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where the live web dashboard listens (default 127.0.0.1 on any free port; the "
        "URL is printed)",
    )
    demo.add_argument(
        "--no-dashboard",
        dest="dashboard",
        action="store_const",
        const=None,
        help="run without the web dashboard",
    )
    add_logging_options(demo, default="warning")
    demo.set_defaults(handler=_demo)


def _run_length(args: argparse.Namespace, default: int | None) -> int | None:
    """--rounds (synchronous strategies) or --versions (fedbuff), checked against the strategy."""
    from fedcoreml.server.coordinator import CoordinatorConfigError

    if args.strategy.lower() == "fedbuff":
        if args.rounds is not None:
            raise CoordinatorConfigError(
                "fedbuff publishes versions: give --versions, not --rounds"
            )
        return args.versions if args.versions is not None else default
    if args.versions is not None:
        raise CoordinatorConfigError(
            f"--versions belongs to --strategy fedbuff; {args.strategy} runs --rounds"
        )
    return args.rounds if args.rounds is not None else default


def _coordinator_config(args: argparse.Namespace, **extra):
    from fedcoreml.server.coordinator import CoordinatorConfig
    from fedcoreml.server.strategies import parse_strategy_args

    return CoordinatorConfig(
        rounds=_run_length(args, 5 if args.command == "demo" else None),
        strategy=args.strategy,
        strategy_args=parse_strategy_args(args.strategy_arg, args.strategy),
        fraction=args.fraction,
        fraction_evaluate=args.fraction_evaluate,
        model=args.model,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        round_timeout=args.round_timeout,
        over_selection=args.over_selection,
        min_reports=args.min_reports,
        concurrency=args.concurrency,
        buffer_size=args.buffer,
        max_staleness=args.max_staleness,
        target_accuracy=args.target_accuracy,
        keep_updates=args.keep_updates,
        **extra,
    )


def _server(args: argparse.Namespace) -> int:
    import logging

    from fedcoreml.server.coordinator import Coordinator, CoordinatorConfigError
    from fedcoreml.server.run_dir import RunDirectory

    tls = args.tls_cert is not None or args.tls_key is not None
    if not tls and not args.insecure and args.resume is None:
        raise CoordinatorConfigError(
            "give --tls-cert and --tls-key, or --insecure to serve devices over plaintext"
        )
    if args.listen is not None:
        _check_listen(args.listen)
    if args.resume is None:
        missing = [f"--{name.replace('_', '-')}" for name in ("run_dir", "min_devices")
                   if getattr(args, name) is None]  # fmt: skip
        if _run_length(args, None) is None:
            missing.insert(1, "--versions" if args.strategy.lower() == "fedbuff" else "--rounds")
        if missing:
            raise CoordinatorConfigError(f"missing {', '.join(missing)} (or use --resume)")
        RunDirectory(args.run_dir).check_new()
    if args.dashboard is not None:  # a bad address or a missing token: refused before anything
        from fedcoreml.server.dashboard import check_dashboard

        check_dashboard(args.dashboard, args.resume or args.run_dir)
    configure_logging(args.log_level, flower=True)
    if args.resume is not None:
        coordinator = Coordinator.resume(args.resume, listen=args.listen)
    else:
        coordinator = Coordinator(
            _coordinator_config(
                args,
                run_dir=args.run_dir,
                min_devices=args.min_devices,
                listen=args.listen or "127.0.0.1:50051",
                eval_data=args.eval_data_dir,
                session_ttl=args.session_ttl,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                require_tokens=args.require_tokens,
                rate_limit=args.rate_limit,
                poll_interval_ms=args.poll_interval_ms,
                long_poll_ms=args.long_poll_ms,
                handout_rate=args.handout_rate,
                mean_on_arrival=not args.hold_updates,
                require_charging=args.require_charging,
                require_unmetered=args.require_unmetered,
                min_battery=args.min_battery,
            )
        )
    if coordinator.config.tls_cert is None:
        logging.getLogger("fedcoreml.coordinator").warning(
            "INSECURE: devices connect over PLAINTEXT gRPC; anyone on the network can read and "
            "alter models and updates. Use --tls-cert/--tls-key outside a trusted network."
        )
    dashboard = _start_dashboard(args.dashboard, coordinator)
    try:
        with stop_signals():
            try:
                coordinator.start()
                final = coordinator.run(lingering=args.linger)
            except StopRequested as stop:
                coordinator.stop()
                print(f"fedcoreml server: {_stopped(args, coordinator, stop)}", file=sys.stderr)
                return stop.exit_code
        print(f"final model: {final}", flush=True)
        if args.linger:
            _linger()
    finally:
        coordinator.stop()
        if dashboard is not None:
            dashboard.stop()
    return 0


def _start_dashboard(listen: str | None, coordinator):
    """The web dashboard ``--dashboard`` asks for, started, its URL printed; or None."""
    if listen is None:
        return None
    from fedcoreml.server.dashboard import start_dashboard

    dashboard = start_dashboard(coordinator, listen)
    token = "" if dashboard.address.loopback else " (open it with ?token=YOUR_DASHBOARD_TOKEN)"
    print(f"dashboard: {dashboard.url}{token}", flush=True)
    return dashboard


def _check_listen(listen: str) -> None:
    """Refuse a malformed or unresolvable --listen, or one the coordinator cannot bind."""
    from fedcoreml.ios_bridge.host_port import AddressError, parse_host_port, resolve
    from fedcoreml.server.gateway.listen import check_listen_address

    try:
        resolve(parse_host_port(listen, allow_any_port=True), passive=True)
    except AddressError as exc:
        raise AddressError(f"--listen {exc}") from None
    check_listen_address(listen)


def _stopped(args: argparse.Namespace, coordinator, stop: StopRequested) -> str:
    """One line: after which round the run stopped, and the command that continues it."""
    from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError

    directory = RunDirectory(coordinator.config.run_dir)
    if not directory.config_file.exists():
        return f"stopped by {stop.name} before the run started; nothing was recorded"
    try:
        last = directory.last_committed_round()
    except RunDirectoryError as exc:
        return f"stopped by {stop.name}; the run directory is damaged: {exc}"
    command = ["fedcoreml", "server", "--resume", str(directory.path)]
    if args.listen is not None:
        command += ["--listen", args.listen]
    if args.linger:
        command.append("--linger")
    rounds = coordinator.config.rounds
    unit = "version" if coordinator.config.asynchronous else "round"
    where = f"after {unit} {last} of {rounds}" if last else f"before {unit} 1 of {rounds} completed"
    return f"stopped by {stop.name} {where}; continue with: {shlex.join(command)}"


def _linger() -> None:
    """Block until SIGTERM or Ctrl-C; the gateway meanwhile tells devices the run is finished."""
    import logging
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logging.getLogger("fedcoreml.coordinator").info(
        "run complete; still telling devices it is finished until stopped (SIGTERM or Ctrl-C)"
    )
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass


def _replay(args: argparse.Namespace) -> int:
    from fedcoreml.server.fedbuff_replay import replay

    def show(version) -> None:
        print(f"version {version.version}: {version.updates} update(s), sha256 "
              f"{version.sha256[:16]}... matches the commit", flush=True)  # fmt: skip

    replayed = replay(args.run_dir, on_version=show)
    print(f"{len(replayed)} version(s) replayed bit for bit")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedcoreml.server.demo import run_demo

    return run_demo(args, _coordinator_config)
