"""``fedcoreml devices``: run a fleet of simulated iPhones against a coordinator."""

from __future__ import annotations

import argparse
import sys

from fedcoreml.ios_bridge.cli_logging import add_logging_options, configure_logging
from fedcoreml.ios_bridge.errors import FedCoreMLError


class DevicesArgumentError(FedCoreMLError):
    """An option of ``fedcoreml devices`` out of range."""


def register(subparsers: argparse._SubParsersAction) -> None:
    devices = subparsers.add_parser(
        "devices",
        help="run simulated iPhones against a coordinator",
        description=(
            "Start N simulated iPhones, each with its own partition of a data set (10% of it "
            "held out for evaluation), that speak the device protocol to the coordinator at "
            "--server: register, fetch tasks, train or evaluate with the Core ML emulator and "
            "submit, until the run is finished. Prints one line per device at the end."
        ),
    )
    devices.add_argument("--server", required=True, metavar="HOST:PORT", help="coordinator")
    devices.add_argument("--count", type=int, required=True, metavar="N", help="devices to run")
    devices.add_argument(
        "--data-dir",
        default=None,
        help="IDX directory, mnist.npz, 'sample' (bundled MNIST sample, the default) "
        "or 'mnist-download'",
    )
    devices.add_argument(
        "--partition",
        default="iid",
        help="how to split the training set: iid (default), dirichlet:ALPHA or shards:K",
    )
    devices.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="use a random subset of N training examples (seeded by --seed) before partitioning",
    )
    devices.add_argument("--seed", type=int, default=0, help="seed for data and behaviour")
    devices.add_argument(
        "--drop-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of the devices that drop out (vanish after a download, never submit)",
    )
    devices.add_argument(
        "--drop-probability",
        type=float,
        default=1.0,
        metavar="P",
        help="per-task chance that a dropping device drops out (default 1: at its first task)",
    )
    devices.add_argument(
        "--slow-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of the devices that straggle (sleep --slow-seconds before submitting)",
    )
    devices.add_argument(
        "--drop-each-round",
        type=float,
        default=0.0,
        metavar="F",
        help="each round, this fraction of the devices vanish mid-task (a fresh choice per round)",
    )
    devices.add_argument(
        "--rejoin-after",
        type=float,
        default=None,
        metavar="S",
        help="a device that vanished comes back this many seconds later, as a relaunched app",
    )
    devices.add_argument(
        "--poison-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of the devices that send poisoned updates (see --poison)",
    )
    devices.add_argument(
        "--poison",
        default="scale:-10",
        help="what poisoned devices send: scale:F (received + F x their real update) or random",
    )
    devices.add_argument(
        "--slow-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="how long a slow device sleeps before submitting each update (default 0)",
    )
    devices.add_argument(
        "--slow-factor",
        type=float,
        default=1.0,
        metavar="F",
        help="a slow device trains F times as long as it would (e.g. 4: an older phone; it "
        "sleeps F - 1 times each training's own time; default 1)",
    )
    devices.add_argument(
        "--give-up-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="stop retrying an unreachable coordinator after this long (default 300)",
    )
    devices.add_argument(
        "--concurrent-training",
        type=int,
        default=1,
        metavar="K",
        help="devices that may train at once (default 1: TensorFlow already uses every core)",
    )
    devices.add_argument(
        "--device-prefix", default="sim", help="device ids are PREFIX-000, PREFIX-001, ..."
    )
    devices.add_argument(
        "--ca-cert",
        default=None,
        metavar="FILE",
        help="connect with TLS, trusting this CA certificate (PEM); without it the connection "
        "is plaintext (a warning is printed)",
    )
    devices.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help='bearer tokens, a JSON object mapping each device id to its token: {"sim-000": '
        '"fcm_...", ...} (what `fedcoreml tokens create --out FILE` writes); every device '
        "must have one",
    )
    devices.add_argument(
        "--availability",
        default="always",
        metavar="PROFILE",
        help="when devices are eligible: always (charging, unmetered, battery full; default) or "
        "phones (~40%% charging at a time in 30-120 s windows, ~70%% unmetered, battery "
        "draining 0.5%%/s off the charger); pairs with `fedcoreml server --require-charging`",
    )
    add_logging_options(devices, default="info")
    devices.set_defaults(handler=_devices)


def _check(args: argparse.Namespace) -> None:
    """Refuse options out of range, and a coordinator address that does not resolve."""
    from fedcoreml.client_sim.availability import AvailabilityError, preset
    from fedcoreml.client_sim.partition import parse_partition_spec
    from fedcoreml.ios_bridge.channel import DEVICE_ID_RULE, valid_device_id
    from fedcoreml.ios_bridge.host_port import AddressError, parse_host_port, resolve

    try:
        resolve(parse_host_port(args.server))
    except AddressError as exc:
        raise DevicesArgumentError(f"--server {exc}") from None
    if args.count < 1:
        raise DevicesArgumentError(f"--count must be at least 1, got {args.count}")
    if args.limit is not None and args.limit < 1:
        raise DevicesArgumentError(f"--limit must be at least 1, got {args.limit}")
    last_id = f"{args.device_prefix}-{args.count - 1:03d}"
    if not valid_device_id(last_id):
        raise DevicesArgumentError(
            f"--device-prefix {args.device_prefix!r} gives device ids like {last_id!r}; a device "
            f"id is {DEVICE_ID_RULE}"
        )
    parse_partition_spec(args.partition)
    if args.slow_fraction > 0 and args.slow_seconds <= 0 and args.slow_factor <= 1:
        raise DevicesArgumentError(
            "--slow-fraction needs --slow-seconds greater than 0 or --slow-factor greater than 1"
        )
    if not args.slow_factor >= 1:
        raise DevicesArgumentError(f"--slow-factor must be >= 1, got {args.slow_factor}")
    if args.slow_seconds < 0:
        raise DevicesArgumentError(f"--slow-seconds must be >= 0, got {args.slow_seconds}")
    for option in (
        "drop_probability",
        "drop_fraction",
        "slow_fraction",
        "drop_each_round",
        "poison_fraction",
    ):
        value = getattr(args, option)
        if not 0.0 <= value <= 1.0:
            flag = "--" + option.replace("_", "-")
            raise DevicesArgumentError(f"{flag} must lie in [0, 1], got {value}")
    if args.give_up_after <= 0:
        raise DevicesArgumentError(f"--give-up-after must be > 0, got {args.give_up_after}")
    if args.concurrent_training < 1:
        raise DevicesArgumentError(
            f"--concurrent-training must be at least 1, got {args.concurrent_training}"
        )
    try:
        preset(args.availability)
    except AvailabilityError as exc:
        raise DevicesArgumentError(f"--availability: {exc}") from None


def _security(args: argparse.Namespace) -> dict[str, str]:
    """Check --ca-cert and read --token-file before any data is loaded; the tokens."""
    from fedcoreml.ios_bridge.channel import channel_credentials
    from fedcoreml.ios_bridge.token_file import read_token_file

    if args.ca_cert is not None:
        channel_credentials(args.ca_cert)  # a missing or non-PEM file fails here, named
    return read_token_file(args.token_file) if args.token_file is not None else {}


def _devices(args: argparse.Namespace) -> int:
    from fedcoreml.ios_bridge.datasets import limit, load_dataset
    from fedcoreml.ios_bridge.extras import require_devices_extra

    require_devices_extra()
    _check(args)
    configure_logging(args.log_level)
    tokens = _security(args)
    data = load_dataset(args.data_dir)
    if args.limit is not None:
        data = limit(data, args.limit, seed=args.seed)

    # Everything the user gave is checked: now the simulated devices (TensorFlow, seconds).
    from fedcoreml.client_sim.device import RetryPolicy
    from fedcoreml.client_sim.fleet import (
        FleetOptions,
        partition_dataset,
        pick_devices,
        run_fleet,
        tune_garbage_collection,
    )

    shares = partition_dataset(data, args.count, args.partition, args.seed)
    options = FleetOptions(
        seed=args.seed,
        drop_devices=pick_devices(args.count, args.drop_fraction, args.seed, "drop"),
        drop_probability=args.drop_probability,
        drop_each_round=args.drop_each_round,
        poison_devices=pick_devices(args.count, args.poison_fraction, args.seed, "poison"),
        poison=args.poison if args.poison_fraction > 0 else None,
        rejoin_after_seconds=args.rejoin_after,
        slow_devices=pick_devices(args.count, args.slow_fraction, args.seed, "slow"),
        slowdown_seconds=args.slow_seconds,
        slowdown_factor=args.slow_factor,
        max_concurrent_training=args.concurrent_training,
        retry=RetryPolicy(give_up_after=args.give_up_after),
        device_id_prefix=args.device_prefix,
        ca_cert=args.ca_cert,
        tokens=tokens,
        availability=args.availability,
    )
    if args.ca_cert is None:
        print(
            f"fedcoreml devices: warning: connecting to {args.server} without TLS (plaintext); "
            "pass --ca-cert FILE to encrypt the connection",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"Running {args.count} simulated device(s) against {args.server} on {data.name} "
        f"({args.partition}, seed {args.seed}): {len(options.drop_devices)} dropping out, "
        f"{len(options.slow_devices)} slow",
        flush=True,
    )
    tune_garbage_collection()
    stats = run_fleet(args.server, shares, options)
    for entry in stats:
        print(entry.summary())
    failed = [entry for entry in stats if entry.error is not None]
    if failed:
        print(f"{len(failed)} of {len(stats)} device(s) ended with an error")
    return 1 if failed else 0
