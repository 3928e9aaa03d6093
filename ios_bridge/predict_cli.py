"""``fedcoreml predict --model FILE INPUT``: a .mlmodel's class and probabilities for an image."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser(
        "predict",
        help="classify a digit image with a .mlmodel (the reference interpreter)",
        description=(
            "Run the reference interpreter on the exact .mlmodel bytes for one image (a PNG, "
            "or a .npy array), made into a 28x28 grey input as MNIST's digits are: white on "
            "black, scaled to 0..1, a larger image's digit fitted into 20x20 and centred. "
            "Prints the predicted class and every class's probability."
        ),
    )
    predict.add_argument("--model", required=True, help="the .mlmodel file")
    predict.add_argument("input", metavar="INPUT", help="a .png image or a .npy array")
    predict.add_argument(
        "--json",
        action="store_true",
        help="print label, probabilities and the 28x28 input the model saw as JSON",
    )
    predict.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from fedcoreml.ios_bridge.predict import predict

    result = predict(args.model, args.input)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    console.print(f"class [bold]{result.label}[/bold] (probability {result.confidence:.4f})")
    table = Table(show_header=True, box=None)
    table.add_column("class", justify="right")
    table.add_column("probability", justify="right")
    for label, probability in result.probabilities.items():
        table.add_row(label, f"{probability:.4f}")
    console.print(table)
    return 0
