"""``fedcoreml train``: train a .mlmodel centrally with the Core ML emulator, as a device would."""

from __future__ import annotations

import argparse


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


def _train(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcoreml.client_sim.emulator import CoreMLEmulator
    from fedcoreml.ios_bridge.datasets import limit, load_dataset
    from fedcoreml.ios_bridge.default_model import build_default_model
    from fedcoreml.ios_bridge.errors import TrainingConfigError
    from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
    from fedcoreml.ios_bridge.mlmodel_io import load_spec, save_spec, spec_from_bytes
    from fedcoreml.ios_bridge.model_info import require_trainable

    console = Console()
    if args.model:
        spec, name = load_spec(args.model), args.model
    else:
        spec, name = build_default_model(seed=args.seed), "default model"
    require_trainable(spec, name)
    data = load_dataset(args.data_dir)
    if args.limit is not None:
        if args.limit < 1:
            raise TrainingConfigError(f"--limit must be at least 1, got {args.limit}")
        data = limit(data, args.limit, seed=args.seed)

    emulator = CoreMLEmulator(spec, name)
    config = emulator.update.resolve(args.epochs, args.batch_size, args.lr)  # fail fast
    console.print(
        f"Training {name} on {data.name}: {len(data.y_train):,} examples, "
        f"{config.epochs} epoch(s), batch {config.batch_size}, {config.optimizer} "
        f"lr {config.learning_rate:g}"
    )
    with Progress(
        TextColumn("epoch {task.completed}/{task.total}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("train", total=config.epochs)

        def report(epoch: int, logs: dict[str, float]) -> None:
            progress.update(task, completed=epoch + 1)
            progress.console.print(
                f"  epoch {epoch + 1}/{config.epochs}: loss {logs['loss']:.4f}, "
                f"accuracy {logs['accuracy']:.4f}"
            )

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
