"""``fedcoreml tokens``: issue, list and revoke the bearer tokens devices authenticate with.

Tokens live, hashed, in ``<run-dir>/tokens.json``; a running coordinator picks up changes (a
revocation, say) at the next call. ``create`` shows each secret once and can add them to a token
file for ``fedcoreml devices --token-file``. ``create --dashboard`` issues a token for the web
dashboard (``fedcoreml server --dashboard``), which requires one when it listens beyond loopback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcoreml.ios_bridge.errors import FedCoreMLError


class TokensArgumentError(FedCoreMLError):
    """Options of ``fedcoreml tokens`` that do not fit together."""


def register(subparsers: argparse._SubParsersAction) -> None:
    tokens = subparsers.add_parser(
        "tokens",
        help="issue, list and revoke device tokens",
        description=(
            "Manage the per-device bearer tokens of a run directory. Only their SHA-256 hashes "
            "are stored (RUN_DIR/tokens.json); a running coordinator sees changes at once."
        ),
    )
    actions = tokens.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_create(actions)
    _add_list(actions)
    _add_revoke(actions)


def _run_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir", type=Path, required=True, help="the coordinator's run directory"
    )


def _add_create(actions: argparse._SubParsersAction) -> None:
    create = actions.add_parser(
        "create",
        help="issue a token for each device and print it (the only time it is shown)",
        description=(
            "Issue one new token per device, for the ids given with --device and/or "
            "PREFIX-000 ... PREFIX-(N-1) with --count (the ids `fedcoreml devices` uses). "
            "Prints 'DEVICE TOKEN' lines; --out also writes them to a token file."
        ),
    )
    _run_dir_option(create)
    create.add_argument(
        "--device", action="append", default=[], metavar="ID", help="a device id (repeatable)"
    )
    create.add_argument("--count", type=int, default=0, metavar="N", help="N numbered devices")
    create.add_argument(
        "--prefix", default="sim", help="id prefix for --count (default: sim, as devices uses)"
    )
    create.add_argument(
        "--dashboard",
        nargs="?",
        const="dashboard",
        default=None,
        metavar="NAME",
        help="issue one token for the web dashboard instead (fedcoreml server --dashboard), "
        "named NAME (default: dashboard); a device token does not open the dashboard, nor a "
        "dashboard token the device port",
    )
    create.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help='also write the tokens to this token file, JSON {"DEVICE_ID": "TOKEN"} (added to '
        "it if it exists; readable by you only), for `fedcoreml devices --token-file`",
    )
    create.set_defaults(handler=_create)


def _add_list(actions: argparse._SubParsersAction) -> None:
    listing = actions.add_parser(
        "list", help="show every token: device, kind, prefix, created, status (never the secret)"
    )
    _run_dir_option(listing)
    listing.set_defaults(handler=_list)


def _add_revoke(actions: argparse._SubParsersAction) -> None:
    revoke = actions.add_parser(
        "revoke",
        help="revoke a device's tokens, or one token by its prefix",
        description="Revoked tokens are refused (UNAUTHENTICATED) from the next call on.",
    )
    _run_dir_option(revoke)
    revoke.add_argument(
        "--device", action="append", default=[], metavar="ID", help="revoke all of its tokens"
    )
    revoke.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="PREFIX",
        help="revoke the token that starts with PREFIX (as `list` shows it) or the whole token",
    )
    revoke.set_defaults(handler=_revoke)


def _device_ids(args: argparse.Namespace) -> list[str]:
    if args.count < 0:
        raise TokensArgumentError(f"--count must be >= 0, got {args.count}")
    ids = list(args.device) + [f"{args.prefix}-{index:03d}" for index in range(args.count)]
    if not ids:
        raise TokensArgumentError("name the devices: --device ID (repeatable) or --count N")
    duplicates = sorted({device_id for device_id in ids if ids.count(device_id) > 1})
    if duplicates:
        raise TokensArgumentError(f"device id(s) given twice: {', '.join(duplicates)}")
    return ids


def _create(args: argparse.Namespace) -> int:
    from fedcoreml.ios_bridge.token_file import write_token_file
    from fedcoreml.server.gateway.tokens import TokenStore, check_device_id

    if args.dashboard is not None:
        return _create_dashboard(args)
    ids = _device_ids(args)
    for device_id in ids:
        check_device_id(device_id)  # refuse all before issuing any
    store = TokenStore(args.run_dir)
    issued = {device_id: store.create(device_id) for device_id in ids}
    width = max(len(device_id) for device_id in issued)
    for device_id, secret in issued.items():
        print(f"{device_id:<{width}}  {secret}")
    if args.out is not None:
        write_token_file(args.out, issued)
    where = f"; written to {args.out}" if args.out is not None else ""
    print(
        f"Issued {len(issued)} token(s){where}. Store them now: {store.path} keeps only their "
        "hashes."
    )
    return 0


def _create_dashboard(args: argparse.Namespace) -> int:
    from fedcoreml.server.gateway.tokens import DASHBOARD, TokenStore, check_device_id

    if args.device or args.count or args.out is not None:
        raise TokensArgumentError(
            "--dashboard issues one dashboard token: give it without --device, --count or --out"
        )
    check_device_id(args.dashboard)
    store = TokenStore(args.run_dir)
    secret = store.create(args.dashboard, kind=DASHBOARD)
    print(f"{args.dashboard}  {secret}")
    print(
        f"Issued a dashboard token. Open the dashboard at http://HOST:PORT/?token={secret} "
        f"(the page then keeps it in a cookie); {store.path} keeps only its hash."
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    from fedcoreml.server.gateway.tokens import TokenStore

    entries = TokenStore(args.run_dir).list()
    if not entries:
        print(f"No tokens in {args.run_dir} (issue some with `fedcoreml tokens create`).")
        return 0
    rows = [("DEVICE", "KIND", "TOKEN", "CREATED", "STATUS")] + [
        (entry.device_id, entry.kind, entry.prefix + "...", entry.created, entry.status)
        for entry in entries
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for *cells, status in rows:
        print(
            "  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True)),
            status,
            sep="  ",
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from fedcoreml.server.gateway.tokens import TokenStore

    targets = list(args.device) + list(args.token)
    if not targets:
        raise TokensArgumentError("name what to revoke: --device ID and/or --token PREFIX")
    store = TokenStore(args.run_dir)
    for target in targets:
        revoked = store.revoke(target)
        if not revoked:
            print(f"{target}: already revoked")
        for entry in revoked:
            print(f"revoked {entry.prefix}... of {entry.device_id}")
    return 0
