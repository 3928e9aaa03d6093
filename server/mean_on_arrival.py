"""FedAvg that owns its round's mean and lets the grid feed it as updates arrive.

FedAvg and the server optimisers built on it (FedAvgM, FedAdam, FedYogi, FedAdagrad) begin their
aggregation with the examples-weighted mean of the updates. :class:`MeanOnArrival` computes that
mean while the round runs instead of from held replies: ``configure_train`` gives a grid that can
feed updates (an :class:`UpdateFeed`, such as DeviceGrid) a fresh
:class:`~fedcoreml.server.streaming_mean.StreamingWeightedMean` for the round; the grid folds
every accepted update into it and replies for each device with that device's metrics only; and
``aggregate_train`` returns the mean. Memory stays one model's worth however many devices report,
and the mean is correctly rounded whatever order they reported in.

The optimiser variants put MeanOnArrival between Flower's class and FedAvg in the method
resolution order (e.g. FedAdam -> FedOpt -> MeanOnArrival -> FedAvg), so their server step is
applied to the mean exactly as it would be to FedAvg's. On a grid that does not feed updates
(Flower's runtime) replies carry their arrays and these classes behave as Flower's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from fedcoreml.server.streaming_mean import StreamingWeightedMean


@runtime_checkable
class UpdateFeed(Protocol):
    """A grid that can fold a round's train updates into an aggregator as they are accepted.

    After ``fold_train_updates(r, aggregator)``, every accepted update of a train message whose
    config says ``server-round`` = r is folded into ``aggregator``, and that device's reply
    carries its MetricRecord but no ArrayRecord. When ``send_and_receive`` returns, the
    aggregator holds exactly the updates whose replies it returned (an abandoned attempt's
    updates are taken out again).
    """

    def fold_train_updates(self, server_round: int, aggregator: StreamingWeightedMean) -> None: ...


@dataclass(frozen=True)
class _RoundMean:
    server_round: int
    aggregator: StreamingWeightedMean
    names: tuple[str, ...]  # the global model's arrays, in order (FedAvgM zips by position)


class MeanOnArrival(FedAvg):
    """FedAvg whose weighted mean is folded in as updates arrive, on a grid that feeds it."""

    _round_mean: _RoundMean | None = None  # the training round being folded, if any

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._round_mean = None
        if messages and isinstance(grid, UpdateFeed):
            aggregator = StreamingWeightedMean()
            grid.fold_train_updates(server_round, aggregator)
            self._round_mean = _RoundMean(server_round, aggregator, tuple(arrays.keys()))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_mean = self._round_mean
        if round_mean is None or round_mean.server_round != server_round:
            return super().aggregate_train(server_round, replies)
        self._round_mean = None
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        contents = [reply.content for reply in valid]
        if contents:
            validate_message_reply_consistency(
                contents, self.weighted_by_key, check_arrayrecord=False
            )
        mean = round_mean.aggregator
        mean.settle()
        weights = [next(iter(c.metric_records.values()))[self.weighted_by_key] for c in contents]
        examples = sum(weights)
        unfolded = sum(bool(c.array_records) for c in contents)
        if unfolded or len(contents) != mean.count or examples != mean.total_examples:
            raise AggregationError(
                f"round {server_round}: {len(contents)} valid replies ({examples} examples, "
                f"{unfolded} still carrying arrays) but {mean.count} updates "
                f"({mean.total_examples} examples) were folded into the mean"
            )
        if not mean.count:
            return None, None
        averaged = dict(mean.mean())
        if set(averaged) == set(round_mean.names):
            averaged = {name: averaged[name] for name in round_mean.names}
        arrays = ArrayRecord({name: Array(value) for name, value in averaged.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class FedAvgMOnArrival(FedAvgM, MeanOnArrival):
    """FedAvgM's server momentum applied to the mean folded on arrival."""


class FedAdamOnArrival(FedAdam, MeanOnArrival):
    """FedAdam's server step applied to the mean folded on arrival."""


class FedYogiOnArrival(FedYogi, MeanOnArrival):
    """FedYogi's server step applied to the mean folded on arrival."""


class FedAdagradOnArrival(FedAdagrad, MeanOnArrival):
    """FedAdagrad's server step applied to the mean folded on arrival."""


# Flower's strategy -> the same strategy folding its mean on arrival.
ON_ARRIVAL: dict[type[FedAvg], type[MeanOnArrival]] = {
    FedAvg: MeanOnArrival,
    FedAvgM: FedAvgMOnArrival,
    FedAdam: FedAdamOnArrival,
    FedYogi: FedYogiOnArrival,
    FedAdagrad: FedAdagradOnArrival,
}
