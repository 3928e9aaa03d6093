"""Benchmark: training through the Core ML emulator vs. a hand-written Keras model.

Both train the reference LeNet (585,958 parameters) on the same data with the same optimizer,
learning rate, batch size and epochs, in the same process, alternating runs so that machine noise
falls on both. The emulator's time covers everything a simulated device does per task: build the
model from the .mlmodel spec, load its parameters, convert the Core ML layout (N,1,28,28) input,
train, and read the parameters back in Core ML layout. The baseline builds, compiles and fits a
Keras model on data already in its own layout.

    python bench/emulator_vs_keras.py [--data-dir ../shared/data/mnist] [--epochs 3] [--repeats 3]

Target: emulator / Keras <= 1.05.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from fedcoreml.client_sim.emulator import CoreMLEmulator
from fedcoreml.client_sim.tensorflow_quiet import keras
from fedcoreml.ios_bridge.datasets import load_dataset
from fedcoreml.ios_bridge.default_model import build_default_model

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def hand_written_keras(x_nhwc: np.ndarray, y: np.ndarray, epochs: int, batch: int, lr: float):
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 2, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(500, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_nhwc, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0)
    return model.get_weights()


def emulator_task(spec, x_coreml: np.ndarray, y: np.ndarray, epochs: int, batch: int, lr: float):
    emulator = CoreMLEmulator(spec, "reference model")
    return emulator.train(x_coreml, y, epochs=epochs, batch_size=batch, learning_rate=lr, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    data = load_dataset(args.data_dir)
    x_coreml, y = data.x_train, data.y_train
    x_nhwc = np.ascontiguousarray(x_coreml.transpose(0, 2, 3, 1))
    spec = build_default_model(seed=0)
    print(
        f"data: {data.name}, {len(y):,} examples; {args.epochs} epochs, batch {args.batch_size}, "
        f"Adam lr {args.lr:g}; {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} CPUs"
    )
    # Warm-up: the first fit in a process pays one-off TensorFlow start-up costs.
    hand_written_keras(x_nhwc[:256], y[:256], 1, args.batch_size, args.lr)
    emulator_task(spec, x_coreml[:256], y[:256], 1, args.batch_size, args.lr)

    keras_times, emulator_times = [], []
    for repeat in range(args.repeats):
        runs = [("keras", keras_times), ("emulator", emulator_times)]
        for name, times in runs if repeat % 2 == 0 else runs[::-1]:
            start = time.perf_counter()
            if name == "keras":
                hand_written_keras(x_nhwc, y, args.epochs, args.batch_size, args.lr)
            else:
                emulator_task(spec, x_coreml, y, args.epochs, args.batch_size, args.lr)
            times.append(time.perf_counter() - start)
            print(f"  run {repeat + 1} {name:8s} {times[-1]:7.2f} s")
    k, e = statistics.median(keras_times), statistics.median(emulator_times)
    print(f"hand-written Keras: {k:.2f} s (median of {args.repeats})")
    print(f"Core ML emulator:   {e:.2f} s (median of {args.repeats})")
    print(f"ratio emulator / Keras: {e / k:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
