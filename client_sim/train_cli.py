"""``fedcoreml train``: train a .mlmodel centrally with the Core ML emulator, as a device would."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # imported by the handler only: building the parser stays fast
    from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
    from fedcoreml.ios_bridge.datasets import Dataset
    from fedcoreml.ios_bridge.update_params import TrainingConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a .mlmodel centrally with the Core ML emulator",
        description=(
            "Train an updatable .mlmodel on one data set the way Core ML's MLUpdateTask would, "
            "report per-epoch progress and the test accuracy of the written model (judged by "
            "the reference interpreter on the exact bytes written), and save it."
        ),
    )
    train.add_argument(
        "--model", help="updatable .mlmodel to train (default: a fresh default model)"
    )
    train.add_argument(
        "--data-dir",
        default=None,
        help="IDX directory, mnist.npz, 'sample' (bundled MNIST sample, the default) "
        "or 'mnist-download'",
    )
    train.add_argument("--epochs", type=int, help="epochs (default: the model's)")
    train.add_argument("--batch-size", type=int, help="mini-batch size (default: the model's)")
    train.add_argument("--lr", type=float, help="learning rate (default: the model's)")
    train.add_argument("--limit", type=int, help="train on a random subset of N examples")
    train.add_argument("--seed", type=int, default=0, help="seed for shuffling and --limit")
    train.add_argument("--out", required=True, help="where to write the trained .mlmodel")
    train.set_defaults(handler=_train)


class _Plan(NamedTuple):
    spec: Model_pb2.Model
    name: str
    config: TrainingConfig
    data: Dataset


def _prepare(args: argparse.Namespace) -> _Plan:
    """Check every option, the model and the data; needs no TensorFlow."""
    from fedcoreml.ios_bridge.datasets import limit, load_dataset
    from fedcoreml.ios_bridge.default_model import build_default_model
    from fedcoreml.ios_bridge.errors import TrainingConfigError
    from fedcoreml.ios_bridge.mlmodel_io import load_spec
    from fedcoreml.ios_bridge.network import parse_network
    from fedcoreml.ios_bridge.update_params import parse_update_params

    if args.limit is not None and args.limit < 1:
        raise TrainingConfigError(f"--limit must be at least 1, got {args.limit}")
    if Path(args.out).is_dir():
        raise TrainingConfigError(f"--out {args.out}: is a directory; give a file name")
    if args.model:
        spec, name = load_spec(args.model), args.model
    else:
        spec, name = build_default_model(seed=args.seed), "default model"
    # Also what require_trainable checks: the model is one fedcoreml can train.
    update = parse_update_params(spec, parse_network(spec, name))
    config = update.resolve(args.epochs, args.batch_size, args.lr)
    data = load_dataset(args.data_dir)
    if args.limit is not None:
        data = limit(data, args.limit, seed=args.seed)
    return _Plan(spec, name, config, data)


def _train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedcoreml.ios_bridge.extras import require_devices_extra

    require_devices_extra(("tensorflow",))
    spec, name, config, data = _prepare(args)

    from fedcoreml.client_sim.emulator import CoreMLEmulator  # TensorFlow: seconds to import
    from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
    from fedcoreml.ios_bridge.mlmodel_io import save_spec, spec_from_bytes

    console = Console(soft_wrap=True)  # piped: no colour codes, no lines cut at 80 columns
    emulator = CoreMLEmulator(spec, name)
    console.print(
        f"Training {name} on {data.name}: {len(data.y_train):,} examples, "
        f"{config.epochs} epoch(s), batch {config.batch_size}, {config.optimizer} "
        f"lr {config.learning_rate:g}"
    )
    with _epoch_progress(console, config.epochs) as report:
        result = emulator.train(
            data.x_train,
            data.y_train,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            seed=args.seed,
            on_epoch_end=report,
        )
    path = save_spec(emulator.updated_spec(), args.out)
    # Judge the file that was written, byte for byte, with the reference interpreter.
    written = spec_from_bytes(path.read_bytes(), str(path))
    loss_name = config.loss.input
    _, emulator_accuracy = emulator.evaluate(data.x_test, data.y_test)
    test_loss, test_accuracy = ReferenceInterpreter(written, str(path)).evaluate(
        data.x_test, data.y_test, loss_name
    )
    console.print(
        f"Trained in {result.seconds:.1f} s. Test accuracy on {len(data.y_test):,} images: "
        f"[bold]{test_accuracy:.4f}[/bold] (loss {test_loss:.4f}; emulator "
        f"{emulator_accuracy:.4f})"
    )
    console.print(f"Wrote {path}")
    return 0


@contextlib.contextmanager
def _epoch_progress(console, epochs: int) -> Iterator[Callable[[int, dict[str, float]], None]]:
    """A per-epoch reporter: one line per epoch, under a live bar when on a terminal."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    def line(epoch: int, logs: dict[str, float]) -> str:
        return (
            f"  epoch {epoch + 1}/{epochs}: loss {logs['loss']:.4f}, "
            f"accuracy {logs['accuracy']:.4f}"
        )

    if not console.is_terminal:
        yield lambda epoch, logs: console.print(line(epoch, logs))
        return
    with Progress(
        TextColumn("epoch {task.completed}/{task.total}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("train", total=epochs)

        def report(epoch: int, logs: dict[str, float]) -> None:
            progress.update(task, completed=epoch + 1)
            progress.console.print(line(epoch, logs))

        yield report
