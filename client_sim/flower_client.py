"""fedcoreml's ClientApp: a simulated iPhone as a Flower node.

Each message carries the global parameters (Core ML layout) and the model's bare architecture;
the node rebuilds from them exactly the .mlmodel a device would download, trains it with the
Core ML emulator on its own partition — as ``fedcoreml devices`` does — and returns every updatable
parameter in Core ML layout, so runs on Flower's engine are comparable with device runs.

The partition comes from the node config (``partition-id``, ``num-partitions``: set by the
simulation runtime, or ``flower-supernode --node-config``), the data and partitioning from the
run config (``data-dir``, ``partition``, ``seed``), split as the fleet splits it (90 % train,
10 % held out for evaluation). A SuperNode with data of its own names it in its node config
(``data-dir=/path``), which wins over the run config's.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcoreml.client_sim.device import DeviceData, architecture_key, task_seed
from fedcoreml.client_sim.emulator import CoreMLEmulator
from fedcoreml.client_sim.fleet import device_seed, partition_dataset
from fedcoreml.ios_bridge.datasets import load_dataset
from fedcoreml.ios_bridge.flower_messages import (
    ACCURACY_KEY,
    BATCH_SIZE_KEY,
    EPOCHS_KEY,
    LEARNING_RATE_KEY,
    LOSS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    TRAIN_SECONDS_KEY,
    model_from_message,
    parameters_to_arrays,
)
from fedcoreml.ios_bridge.parameters import get_parameters

log = logging.getLogger("fedcoreml.flower_client")

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _partitions(data_dir: str, partition: str, count: int, seed: int) -> tuple[DeviceData, ...]:
    dataset = load_dataset(data_dir or None)
    return tuple(partition_dataset(dataset, count, partition, seed))


def node_data(context: Context) -> tuple[DeviceData, int]:
    """This node's data, and its device seed (as the fleet's device of the same index)."""
    node, run = context.node_config, context.run_config
    index, count = int(node["partition-id"]), int(node["num-partitions"])
    seed = int(run.get("seed", 0))
    data_dir = str(node.get("data-dir", run.get("data-dir", "")))
    parts = _partitions(data_dir, str(run.get("partition", "iid")), count, seed)
    return parts[index], device_seed(seed, index)


_emulators: dict[str, CoreMLEmulator] = {}


def _emulator(msg: Message) -> tuple[CoreMLEmulator, Any]:
    arrays = next(iter(msg.content.array_records.values()))
    config = next(iter(msg.content.config_records.values()))
    spec = model_from_message(arrays, config)
    key = architecture_key(spec)
    emulator = _emulators.get(key)
    if emulator is None:  # a ClientApp process may serve many rounds: build the graph once
        emulator = _emulators[key] = CoreMLEmulator(spec, "global model")
    else:
        emulator.set_parameters(get_parameters(spec, "global model"))
    return emulator, config


@app.train()
def train(msg: Message, context: Context) -> Message:
    emulator, config = _emulator(msg)
    data, seed = node_data(context)
    server_round = int(config.get(ROUND_KEY, 0))
    result = emulator.train(
        data.x_train,
        data.y_train,
        epochs=int(config.get(EPOCHS_KEY, 0)) or None,
        batch_size=int(config.get(BATCH_SIZE_KEY, 0)) or None,
        learning_rate=float(config.get(LEARNING_RATE_KEY, 0.0)) or None,
        seed=task_seed(seed, f"round-{server_round}"),
    )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: result.num_examples,
            LOSS_KEY: result.loss,
            ACCURACY_KEY: result.accuracy,
            TRAIN_SECONDS_KEY: result.seconds,
        }
    )
    content = RecordDict({"arrays": parameters_to_arrays(result.parameters), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    emulator, _config = _emulator(msg)
    data, _seed = node_data(context)
    loss, accuracy = emulator.evaluate(data.x_eval, data.y_eval)
    metrics = MetricRecord(
        {NUM_EXAMPLES_KEY: data.num_eval, LOSS_KEY: loss, ACCURACY_KEY: accuracy}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
