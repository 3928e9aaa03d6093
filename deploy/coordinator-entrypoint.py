#!/usr/bin/env python3
"""Entry point of the coordinator image: start the run, or continue it after a restart.

Takes the arguments of ``fedcoreml server``. When ``--run-dir`` already holds a run (its
``run.json``: the container is being restarted after a crash, an out-of-memory kill or a node
drain), it runs ``fedcoreml server --resume RUN_DIR`` (keeping ``--listen`` and ``--linger``)
instead, so a restart
continues after the last committed round with the configuration the run was started with,
rather than starting a second run over the first one's files. A run that had finished is only
finished again: final.mlmodel is rewritten, bit for bit the same, and the process exits.

SIGTERM (``docker stop``, a pod's deletion) stops the coordinator: the gRPC server shuts down,
one line says after which round it stopped, and the process exits with 143 (128 + SIGTERM);
everything committed stays in the run directory.
"""

from __future__ import annotations

import signal
import sys

from fedcoreml.server.cli import build_parser, main


def server_argv(argv: list[str]) -> list[str]:
    """The ``fedcoreml`` arguments to run for the entry point's arguments ``argv``."""
    args = build_parser().parse_args(["server", *argv])
    if args.resume is None and args.run_dir is not None and (args.run_dir / "run.json").is_file():
        resumed = ["server", "--resume", str(args.run_dir)]
        if args.listen is not None:
            resumed += ["--listen", args.listen]
        if args.linger:
            resumed.append("--linger")
        return resumed
    return ["server", *argv]


if __name__ == "__main__":
    command = server_argv(sys.argv[1:])
    if "--resume" in command and "--resume" not in sys.argv[1:]:
        print(
            f"fedcoreml-coordinator: {command[2]} holds a run already; resuming it",
            file=sys.stderr,
            flush=True,
        )
    # PID 1 ignores SIGTERM unless it installs a handler: until the coordinator installs its
    # own (which says where the run stopped), treat it as an interrupt.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main(command))
