"""Strategy options: typed by the strategy's constructor, refused in one line before any device."""

from __future__ import annotations

import subprocess
import sys

import pytest
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum

from fedcoreml.server.mean_on_arrival import MeanOnArrival
from fedcoreml.server.run_config import CoordinatorConfig
from fedcoreml.server.strategies import (
    STRATEGY_NAMES,
    StrategyError,
    check_strategy_options,
    make_strategy,
    parse_strategy_args,
)
from fedcoreml.server.strategy_options import ConstructorOptions, typed_options


def strategy(name: str, options=None, fold: bool = True):
    return make_strategy(
        name, fraction_train=1.0, fraction_evaluate=0.0, min_devices=2, options=options,
        fold_on_arrival=fold,
    )  # fmt: skip


def test_values_take_the_type_of_the_constructor_parameter():
    options = parse_strategy_args(["server-momentum=1", "server_learning_rate=0.5"], "FedAvgM")
    assert options == {"server_momentum": 1.0, "server_learning_rate": 0.5}
    assert type(options["server_momentum"]) is float
    krum = parse_strategy_args(["num_malicious_nodes=1"], "krum")
    assert krum == {"num_malicious_nodes": 1} and type(krum["num_malicious_nodes"]) is int
    dp = parse_strategy_args(["clipping_norm=5", "noise_multiplier=0.1"], "dp-fixed")
    assert dp == {"clipping_norm": 5.0, "noise_multiplier": 0.1}
    assert parse_strategy_args(["clipped_count_stddev=none"], "dp-adaptive") == {
        "clipped_count_stddev": None
    }
    assert strategy("fedavgm", options).server_momentum == 1.0


@pytest.mark.parametrize(
    ("name", "item", "message"),
    [
        ("fedavgm", "server_momentum=abc",
         "strategy fedavgm: server_momentum must be a float, got 'abc'"),
        ("fedadam", "eta=nan", "strategy fedadam: eta must be a float, got 'nan'"),
        ("krum", "num_malicious_nodes=1.5",
         "strategy krum: num_malicious_nodes must be an int, got '1.5'"),
        ("dp-adaptive", "clipped_count_stddev=x",
         "strategy dp-adaptive: clipped_count_stddev must be a float or none, got 'x'"),
        ("fedavgm", "momentum=0.9",
         "strategy fedavgm: unknown option 'momentum' (options it takes: server_learning_rate, "
         "server_momentum)"),
        ("fedavg", "beta=0.1", "strategy fedavg: unknown option 'beta' (options it takes: none)"),
        ("fedavg", "fraction_train=0.5",
         "strategy fedavg: fraction_train is set by fedcoreml, not an option"),
        ("dp-fixed", "num_sampled_clients=3",
         "strategy dp-fixed: num_sampled_clients is set by fedcoreml, not an option"),
        ("fedavg", "train_metrics_aggr_fn=sum",
         "strategy fedavg: train_metrics_aggr_fn cannot be given as KEY=VALUE"),
        ("fedavg", "server_momentum", "strategy option 'server_momentum' is not KEY=VALUE"),
        ("fedcool", "x=1",
         f"unknown strategy 'fedcool'; choose one of {', '.join(STRATEGY_NAMES)}"),
    ],
)  # fmt: skip
def test_a_bad_option_is_one_line_naming_strategy_key_value_and_type(name, item, message):
    with pytest.raises(StrategyError) as refused:
        parse_strategy_args([item], name)
    assert str(refused.value) == message


def test_saved_typed_values_are_checked_the_same_way():
    # run.json holds typed values; older runs held numbers guessed from the text
    assert check_strategy_options("fedavgm", {"server_momentum": 0}) == {"server_momentum": 0.0}
    with pytest.raises(StrategyError, match="server_momentum must be a float, got 'abc'"):
        strategy("fedavgm", {"server_momentum": "abc"})
    with pytest.raises(StrategyError, match="must be an int, got True"):
        check_strategy_options("krum", {"num_malicious_nodes": True})
    with pytest.raises(StrategyError, match=r"strategy dp-fixed: .*noise multiplier"):
        strategy("dp-fixed", {"noise_multiplier": -1.0})  # Flower's own range check, one line


def test_bools_ints_and_optional_values():
    class Toy:
        def __init__(self, flag: bool = False, limit: int | None = None, label="x", fn=None):
            pass

    parameters = ConstructorOptions(Toy)
    typed = typed_options("toy", {"flag": "TRUE", "limit": "none", "label": "a=b"}, parameters)
    assert typed == {"flag": True, "limit": None, "label": "a=b"}
    assert typed_options("toy", {"flag": "0", "limit": "7"}, parameters) == {
        "flag": False, "limit": 7
    }  # fmt: skip
    with pytest.raises(StrategyError, match=r"flag must be a bool \(true/false/1/0\), got 'yes'"):
        typed_options("toy", {"flag": "yes"}, parameters)
    with pytest.raises(StrategyError, match="fn cannot be given"):
        typed_options("toy", {"fn": "print"}, parameters)


def test_the_fedavg_family_folds_on_arrival_and_the_others_never_do():
    for name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert isinstance(strategy(name), MeanOnArrival)
        assert not isinstance(strategy(name, fold=False), MeanOnArrival)  # --hold-updates
    assert type(strategy("fedmedian")) is FedMedian and type(strategy("krum")) is Krum
    for name in ("dp-fixed", "dp-adaptive"):  # clipping needs every update
        assert type(strategy(name).strategy) is FedAvg


def test_the_coordinator_refuses_a_bad_option_before_contacting_any_device(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fedcoreml.server.cli", "server", "--insecure",
         "--run-dir", str(run_dir), "--rounds", "1", "--min-devices", "1",
         "--listen", "127.0.0.1:0", "--strategy", "fedavgm",
         "--strategy-arg", "server_momentum=abc"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "fedcoreml server: error: strategy fedavgm: server_momentum must be a float, got 'abc'"
    )
    assert "Traceback" not in result.stderr and not run_dir.exists()
    config = CoordinatorConfig(run_dir, 1, 1, strategy="fedavgm")
    config.strategy_args = {"server_momentum": "abc"}  # e.g. a hand-edited run.json
    from fedcoreml.server.coordinator import Coordinator

    with pytest.raises(StrategyError, match="server_momentum must be a float"):
        Coordinator(config)  # before it listens
