"""``fedcoreml model init`` and ``fedcoreml model inspect``."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="create and inspect updatable Core ML models")
    actions = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init", help="write the default updatable MNIST LeNet (585,958 parameters)"
    )
    init.add_argument("--out", required=True, help="where to write the .mlmodel")
    init.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    init.set_defaults(handler=_init)

    inspect = actions.add_parser("inspect", help="describe a .mlmodel and check it is trainable")
    inspect.add_argument("file", help="a .mlmodel file")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    inspect.set_defaults(handler=_inspect)


def _init(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedcoreml.ios_bridge.default_model import build_default_model
    from fedcoreml.ios_bridge.mlmodel_io import save_spec
    from fedcoreml.ios_bridge.parameters import count_parameters

    spec = build_default_model(seed=args.seed)
    path = save_spec(spec, args.out)
    Console().print(
        f"Wrote {path} (updatable NeuralNetwork, {count_parameters(spec):,} parameters, "
        f"seed {args.seed})"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from fedcoreml.ios_bridge.mlmodel_io import load_spec
    from fedcoreml.ios_bridge.model_info import describe

    info = describe(load_spec(args.file), model_name=args.file)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_description(info)
    return 0 if info["trainable"] else 1


def _fmt_range(value: dict[str, Any]) -> str:
    if "allowed" in value:
        return f"{value['default']:g} (allowed {{{', '.join(str(v) for v in value['allowed'])}}})"
    return f"{value['default']:g} (allowed {value['min']:g} .. {value['max']:g})"


def _print_description(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{info['model']}[/bold]: {info['model_type']}, specification version "
        f"{info['specification_version']}, {'updatable' if info['updatable'] else 'not updatable'}"
    )
    for title, key in (
        ("inputs", "inputs"),
        ("outputs", "outputs"),
        ("training inputs", "training_inputs"),
    ):
        features = ", ".join(
            f"{f['name']} {f.get('dtype', f['type'])} {f.get('shape', '')}" for f in info[key]
        )
        console.print(f"  {title}: {features or '-'}")
    table = Table(title="layers", show_lines=False)
    for column in ("name", "type", "input shape", "output shape", "parameters", "updatable"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for layer in info["layers"]:
        table.add_row(
            layer["name"],
            layer["type"],
            str(layer.get("input_shape", "?")),
            str(layer.get("output_shape", "?")),
            f"{layer['parameters']:,}",
            "yes" if layer["updatable"] else "",
        )
    console.print(table)
    console.print(
        f"  total parameters: {info['total_parameters']:,} "
        f"(updatable: {info['trainable_parameters']:,})"
    )
    if "loss" in info:
        loss = info["loss"]
        console.print(f"  loss: {loss['type']} on '{loss['input']}', target '{loss['target']}'")
        optimizer = info["optimizer"]
        details = ", ".join(
            f"{name} {_fmt_range(value)}" for name, value in optimizer.items() if name != "type"
        )
        console.print(f"  optimizer: {optimizer['type']}: {details}")
        console.print(f"  epochs: {_fmt_range(info['epochs'])}; shuffle: {info['shuffle']}")
    if info["trainable"]:
        console.print("  [green]fedcoreml can train this model[/green]")
    else:
        console.print(f"  [red]fedcoreml cannot train this model[/red]: {info['problem']}")
