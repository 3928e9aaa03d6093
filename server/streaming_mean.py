"""The examples-weighted mean of device updates, folded in as they arrive.

For strategies whose aggregation starts with the weighted mean of the replies (FedAvg and the
server-optimizer family built on it: FedAvgM, FedAdam, FedYogi, FedAdagrad), the coordinator does
not need to hold every update until the round closes: each accepted update is folded into a
running sum and dropped, so memory stays at one model's worth however many devices report.
:class:`~fedcoreml.server.mean_on_arrival.MeanOnArrival` owns one such mean per round and hands
it to its optimiser as the weighted mean it would have computed from the held updates.

The sum is kept as a float64 value plus its exact rounding error (Knuth's TwoSum), so the result
is the correctly rounded weighted mean whatever order the updates arrived in: two runs that
received the same updates produce bit-identical models, even though phones report in a
different order each time. ``num_examples * value`` is exact in float64 (a float32 has a 24-bit
significand, the gateway caps the example count below 2**24).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from fedcoreml.server.gateway.task_board import UpdateResult

Parameters = list[tuple[str, np.ndarray]]
MAX_EXACT_WEIGHT = 2**24


@dataclass
class _Sum:
    high: np.ndarray  # float64 running sum
    low: np.ndarray  # float64 accumulated rounding error of ``high``
    # work space, reused for every update (no allocation per fold)
    term: np.ndarray = field(repr=False)
    spare: np.ndarray = field(repr=False)
    part: np.ndarray = field(repr=False)
    error: np.ndarray = field(repr=False)

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> _Sum:
        return cls(*(np.zeros(shape, np.float64) for _ in range(6)))


class StreamingWeightedMean:
    """Thread-safe running mean of updates weighted by their example count.

    The task board calls ``reserve`` when it accepts an update (under its lock, so nothing is
    counted twice) and ``add`` right after (outside it); ``settle`` waits until every accepted
    update has been folded in. Only the tensors are summed: each device's metrics travel in its
    own reply.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sums: dict[str, _Sum] = {}
        self._order: list[str] = []
        self._pending = 0
        self.count = 0
        self.total_examples = 0

    def reserve(self) -> None:
        with self._cond:
            self._pending += 1

    def add(self, result: UpdateResult) -> None:
        """Fold one accepted update in; its tensors are not kept."""
        weight = result.num_examples
        if not 0 < weight < MAX_EXACT_WEIGHT:
            raise ValueError(f"num_examples {weight} is outside (0, 2**24)")
        with self._cond:
            try:
                for name, value in result.parameters:  # check all before changing any
                    known = self._sums.get(name)
                    if known is not None and known.high.shape != np.shape(value):
                        raise ValueError(
                            f"tensor {name!r}: shape {np.shape(value)}, expected {known.high.shape}"
                        )
                for name, value in result.parameters:
                    self._fold(name, value, float(weight))
                self.count += 1
                self.total_examples += weight
            finally:
                self._pending -= 1
                self._cond.notify_all()

    def _fold(self, name: str, value: np.ndarray, weight: float) -> None:
        running = self._sums.get(name)
        if running is None:
            running = self._sums[name] = _Sum.empty(np.shape(value))
            self._order.append(name)
        term = np.multiply(value, weight, out=running.term, dtype=np.float64)  # exact
        # TwoSum: high + term == total + error exactly; the error joins the low part.
        total = np.add(running.high, term, out=running.spare)
        taken = np.subtract(total, running.high, out=running.part)  # the part of term taken
        error = np.subtract(total, taken, out=running.error)
        np.subtract(running.high, error, out=error)  # what high lost
        np.subtract(term, taken, out=taken)  # what term lost
        error += taken
        running.low += error
        running.spare, running.high = running.high, total

    def settle(self, timeout_s: float | None = None) -> bool:
        """Wait until every reserved update has been added; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout_s)

    def clear(self) -> None:
        """Forget every update folded so far (an attempt whose replies were thrown away).

        Call it once nothing can be reserved any more and after :meth:`settle`.
        """
        with self._cond:
            if self._pending:
                raise RuntimeError(f"{self._pending} reserved update(s) not added yet")
            self._sums.clear()
            self._order.clear()
            self.count = 0
            self.total_examples = 0

    def mean(self) -> Parameters:
        """The weighted mean as float32, in the order the tensors first arrived."""
        with self._cond:
            if not self.count:
                raise ValueError("no update has been added")
            total = float(self.total_examples)
            return [
                (name, ((self._sums[name].high + self._sums[name].low) / total).astype(np.float32))
                for name in self._order
            ]
