#!/usr/bin/env python3
"""Make a throwaway CA and a server certificate for the coordinator's device port.

    python deploy/make-certs.py --out deploy/certs [--host coordinator.example.org ...]

writes into --out:

    ca.pem          the CA certificate: what devices trust (`fedcoreml devices --ca-cert`)
    server.pem      the coordinator's certificate, signed by the CA (`--tls-cert`)
    server-key.pem  its private key, readable by its owner only (`--tls-key`)

The server certificate is valid for localhost, 127.0.0.1, ::1, the Compose service name
``coordinator`` and the Kubernetes Service ``fedcoreml-coordinator`` in namespace ``fedcoreml``
(short and fully qualified names), plus every --host. The CA's private key is discarded: nothing
else can ever be signed by this CA. Existing files are never replaced without --force.

For local and test deployments only: a real deployment uses certificates from its own CA.
Needs the fedcoreml package (``pip install .``); the coordinator image ships this script as
``fedcoreml-make-certs``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from fedcoreml.server.gateway.tls import generate_test_ca

NAMESPACE = "fedcoreml"
SERVICE = "fedcoreml-coordinator"
DEFAULT_HOSTS = (
    "localhost",
    "127.0.0.1",
    "::1",
    "coordinator",  # deploy/compose.yaml
    SERVICE,  # deploy/k8s: the Service, from inside its namespace ...
    f"{SERVICE}.{NAMESPACE}",
    f"{SERVICE}.{NAMESPACE}.svc",
    f"{SERVICE}.{NAMESPACE}.svc.cluster.local",  # ... and fully qualified
)
FILES = ("ca.pem", "server.pem", "server-key.pem")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make-certs",
        description="Write ca.pem, server.pem and server-key.pem (a throwaway CA and a server "
        "certificate signed by it) for the coordinator's TLS device port.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("certs"), help="folder to write into (default: certs)"
    )
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address for the server certificate (repeatable); "
        f"always included: {', '.join(DEFAULT_HOSTS)}",
    )
    parser.add_argument("--days", type=int, default=365, help="validity (default 365)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--force", action="store_true", help="replace existing files")
    existing.add_argument(
        "--keep-existing",
        action="store_true",
        help="when all three files exist already, keep them and exit 0 (for a container that "
        "runs this at every start)",
    )
    return parser


def hostnames(extra: list[str]) -> list[str]:
    """The server certificate's names: the defaults, then ``extra``, without repeats."""
    return list(dict.fromkeys([*DEFAULT_HOSTS, *extra]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    if args.days < 1:
        print(f"make-certs: error: --days must be at least 1, got {args.days}", file=sys.stderr)
        return 2
    present = [out / name for name in FILES if (out / name).exists()]
    if present and not args.force:
        if args.keep_existing and len(present) == len(FILES):
            print(f"make-certs: {out} holds ca.pem, server.pem and server-key.pem; kept them")
            return 0
        names = ", ".join(str(path) for path in present)
        print(
            f"make-certs: error: {names} exist(s) already; nothing was written "
            "(use --force to replace them)",
            file=sys.stderr,
        )
        return 1
    names = hostnames(args.host)
    out.mkdir(parents=True, exist_ok=True)
    # Generate next to the targets, then move the three files in; the CA key stays behind in
    # the temporary folder and is deleted with it.
    with tempfile.TemporaryDirectory(prefix=".make-certs-", dir=out) as tmp:
        paths = generate_test_ca(tmp, names, days=args.days)
        moves = (
            (paths.ca_cert, "ca.pem"),
            (paths.server_cert, "server.pem"),
            (paths.server_key, "server-key.pem"),  # created 0600 by the atomic write
        )
        for source, name in moves:
            os.replace(source, out / name)
    print(f"make-certs: wrote {out}/ca.pem, {out}/server.pem, {out}/server-key.pem (0600)")
    print(f"  server certificate valid {args.days} days for: {', '.join(names)}")
    print("Kubernetes (deploy/k8s): create the namespace, then the Secret and the CA ConfigMap:")
    print("  kubectl apply -f deploy/k8s/namespace.yaml")
    print(
        f"  kubectl -n {NAMESPACE} create secret tls fedcoreml-tls "
        f"--cert={out}/server.pem --key={out}/server-key.pem"
    )
    print(f"  kubectl -n {NAMESPACE} create configmap fedcoreml-ca --from-file=ca.pem={out}/ca.pem")
    return 0


if __name__ == "__main__":
    sys.exit(main())
