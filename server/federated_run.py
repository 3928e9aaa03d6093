"""One federated run on any Flower Grid: the strategy's rounds, each round's .mlmodel, judging.

The same code runs for ``fedcoreml server`` (over DeviceGrid, whose nodes are devices behind the
gRPC gateway) and for the Flower App's ServerApp (over the Grid Flower's runtime hands it, whose
nodes are SuperNodes or simulated clients). After every round it bakes the new global parameters
into the exact .mlmodel that will be shipped next and commits it to the run directory (model file,
then commit record, both durable) before anything can name that version to a device; judging the
file with the reference interpreter on held-out data follows in the background and appends the
round's metrics line. No TensorFlow here: the spec, numpy and Flower only.

With ``--strategy fedbuff`` the run is asynchronous (fedbuff.py): its "rounds" are model
versions, each committed the same way before any task can carry it, with the updates it applied
(node, base version, staleness, weight, sha256 of what arrived) in its commit record and, for a
server optimiser with state, that state beside the model, so a resumed run steps on exactly.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from flwr.app import ArrayRecord, ConfigRecord

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.datasets import Dataset, load_dataset
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.flower_messages import (
    ARCHITECTURE_KEY,
    BATCH_SIZE_KEY,
    EPOCHS_KEY,
    LEARNING_RATE_KEY,
    arrays_to_parameters,
    parameters_to_arrays,
)
from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
from fedcoreml.ios_bridge.mlmodel_io import load_spec, spec_from_bytes, spec_to_bytes
from fedcoreml.ios_bridge.network import parse_network
from fedcoreml.ios_bridge.parameters import get_parameters, strip_parameters
from fedcoreml.ios_bridge.update_params import TrainingConfig, parse_update_params
from fedcoreml.server import crash_points
from fedcoreml.server.device_grid import DeviceGrid
from fedcoreml.server.exchanges import ExchangeStats, RecordingGrid
from fedcoreml.server.fedbuff import FedBuff, VersionRecord
from fedcoreml.server.fedbuff_math import ServerState
from fedcoreml.server.gateway.task_board import RoundModel
from fedcoreml.server.model_store import ModelStore
from fedcoreml.server.run_config import (
    COMMITTED_FIELDS,
    CoordinatorConfig,
    RoundRecord,
    check_config,
)
from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError
from fedcoreml.server.strategies import make_strategy

log = logging.getLogger("fedcoreml.coordinator")


class FederatedRun:
    """A run's model, strategy and run directory; :meth:`run` drives the rounds on a Grid."""

    def __init__(
        self,
        config: CoordinatorConfig,
        on_round: Callable[[RoundRecord], None] | None = None,
        resume_after: int | None = None,
        run_id: int | None = None,
    ) -> None:
        check_config(config)
        crash_points.configured()  # a malformed FEDCOREML_CRASH_AT is refused before anything
        self.config = config
        self.on_round = on_round
        # Resuming: rounds up to and including this one are committed in the run directory.
        self.resume_after = resume_after
        self.start_round = resume_after or 0
        self.run_dir = RunDirectory(config.run_dir)
        self.spec, self.model_name = self._load_model()
        network = parse_network(self.spec, self.model_name)
        self.training: TrainingConfig = parse_update_params(self.spec, network).resolve(
            config.local_epochs, config.batch_size, config.learning_rate
        )
        self.probabilities = self.training.loss.input
        self.strategy = make_strategy(
            config.strategy,
            fraction_train=config.fraction,
            fraction_evaluate=config.fraction_evaluate,
            min_devices=config.min_devices,
            options=config.strategy_args,
            fold_on_arrival=config.mean_on_arrival,
            asynchronous={
                "concurrency": config.fedbuff_concurrency,
                "buffer_size": config.fedbuff_buffer,
                "max_staleness": config.max_staleness,
            },
        )
        self.eval_data: Dataset = load_dataset(config.eval_data)
        self.store = ModelStore(self.spec, self.model_name)
        self.run_id = run_id if run_id is not None else secrets.randbits(63)
        self.records: list[RoundRecord] = []
        # model version -> sha256 of every committed round; a version is committed once, for good
        self._commit_lock = threading.Lock()
        self._committed: dict[int, str] = {}
        self._committed_at: dict[int, float | None] = {}  # version -> elapsed_s at its commit
        self._unjudged: list[dict] = []
        # wall time: this process's start, and what the run had used before a restart
        self._started = time.monotonic()
        self._elapsed_before = 0.0
        if resume_after is not None:
            commits = self.run_dir.committed()
            self._committed = {int(c["round"]): c["model_sha256"] for c in commits}
            self._unjudged = self.run_dir.unjudged(commits)
            if commits:
                self._elapsed_before = float(commits[-1].get("elapsed_s") or 0.0)
        self._history: Callable[[], list[ExchangeStats]] = list
        self.final_version = config.rounds

    def _load_model(self) -> tuple[Model_pb2.Model, str]:
        if self.resume_after is not None:
            # The committed global model, bit for bit: architecture, settings and parameters.
            path = self.run_dir.round_model(self.resume_after)
            name = str(self.config.model) if self.config.model else "default model"
            return load_spec(path), name
        if self.config.model is None:
            return build_default_model(seed=self.config.model_seed), "default model"
        return load_spec(self.config.model), str(self.config.model)

    def architecture(self) -> bytes:
        """The model without its updatable parameters' values (what nodes need besides arrays)."""
        return spec_to_bytes(strip_parameters(self.spec, self.model_name))

    # -- the run ------------------------------------------------------------------------------

    def run(
        self,
        grid: DeviceGrid | RecordingGrid,
        ship_architecture: bool = False,
        judge_in_background: bool = True,
    ) -> RoundModel:
        """Run every round on ``grid``; returns the final model, written as final.mlmodel.

        The grid's recorded exchanges (``grid.history``) go into the metrics;
        ``ship_architecture`` adds the model's architecture to every message's config.
        ``judge_in_background`` overlaps judging a round's model with the next round. Without
        it, judging runs in line, and the initial model is judged only after the first exchange:
        Flower's simulation runtime starts Ray beside the ServerApp, and a fork while OpenBLAS
        is multiplying (the interpreter's convolutions) leaves the multiplication waiting
        forever for worker threads the fork handler shut down.
        """
        config = self.config
        parameters = get_parameters(self.spec, self.model_name)
        continuing = self.run_dir.config_file.exists()
        if self.resume_after is None:  # refuses a directory that holds another run
            self.run_dir.write_config(
                {**config.to_json(), "model_name": self.model_name, "run_id": self.run_id}
            )
        if continuing:
            for leftover in self.run_dir.remove_leftovers():
                log.info("removed %s, left by a write that a crash interrupted", leftover)
        if self.resume_after is not None:
            committed = self.store.build(parameters, self.resume_after)
            self.publish(committed)  # refuses a reload that is not the committed model's bytes
            log.info(
                "resuming run %d after round %d of %d (global model sha256 %s)",
                self.run_id, self.resume_after, config.rounds, committed.sha256,
            )  # fmt: skip
        self._history = lambda: grid.history
        initial = parameters_to_arrays(parameters)
        shared = {ARCHITECTURE_KEY: self.architecture()} if ship_architecture else {}
        train_config = ConfigRecord(
            {
                EPOCHS_KEY: self.training.epochs,
                BATCH_SIZE_KEY: self.training.batch_size,
                LEARNING_RATE_KEY: self.training.learning_rate,
                **shared,
            }
        )
        log.info(
            "run %d: %s, %d round(s), waiting for %d device(s); local training: %d epoch(s), "
            "batch %d, lr %g",
            self.run_id, config.strategy, config.rounds, config.min_devices,
            self.training.epochs, self.training.batch_size, self.training.learning_rate,
        )  # fmt: skip
        remaining = config.rounds - self.start_round
        self._started = time.monotonic()
        self._judge_in_background = judge_in_background
        self._deferred: list[tuple] = []
        self._judge = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        self._judgements: list[Future[RoundRecord]] = []
        arrays = initial  # every round was committed before the crash: just finish
        try:
            self._judge_committed()
            if remaining > 0 and isinstance(self.strategy, FedBuff):
                arrays = self._run_fedbuff(grid, initial, remaining, train_config)
            elif remaining > 0:
                result = self.strategy.start(
                    grid=grid,
                    initial_arrays=initial,
                    num_rounds=remaining,
                    timeout=config.round_timeout,
                    train_config=train_config,
                    evaluate_config=ConfigRecord(shared),
                    evaluate_fn=self._after_round,
                )
                arrays = result.arrays if len(result.arrays) else initial
        finally:
            self._judge.shutdown(wait=True)
        self._judge_deferred()
        for judgement in self._judgements:
            judgement.result()  # re-raise a failure of the evaluation thread
        return self._complete(arrays)

    def _run_fedbuff(
        self,
        grid: DeviceGrid | RecordingGrid,
        initial: ArrayRecord,
        versions: int,
        train_config: ConfigRecord,
    ) -> ArrayRecord:
        """FedBuff until ``versions`` more versions or the target accuracy; the last version."""
        assert isinstance(self.strategy, FedBuff)
        self._after_round(0, initial)  # version 0 committed and judged, as a strategy's start does
        state = ServerState(steps=self.start_round)
        saved = self.run_dir.read_server_state(self.start_round)
        if saved is not None:
            state = ServerState.from_bytes(saved)
        self.final_version = self.start_round
        return self.strategy.start(
            grid,
            initial,
            versions,
            self.config.round_timeout,
            train_config,
            on_version=self._after_version,
            should_stop=self._target_reached,
            state=state,
            first_version=self.start_round,
        )

    def _target_reached(self) -> bool:
        target = self.config.target_accuracy
        return target is not None and any(r.test_accuracy >= target for r in list(self.records))

    def _after_version(
        self, record: VersionRecord, arrays: ArrayRecord, state: ServerState
    ) -> None:
        """FedBuff's on_version: commit the version (and what it applied), have it judged."""
        assert isinstance(self.strategy, FedBuff)
        version = record.version + self.start_round
        model = self.store.build(arrays_to_parameters(arrays), version=version)
        names = [_update_name(i, u.node_id) for i, u in enumerate(record.applied)]
        if self.config.keep_updates:  # durable before the commit that names them
            kept = [(name, u.trained) for name, u in zip(names, record.applied, strict=True)]
            self.run_dir.write_updates(version, kept)
        if self.strategy.optimizer.stateful:
            self.run_dir.write_server_state(version, state.to_bytes())
        fields = {
            "devices_sampled": record.handed_out,
            "devices_reported": record.accepted,
            "devices_failed": sum(record.failed.values()),
            "examples": sum(u.num_examples for u in record.applied),
            "seconds": round(record.seconds, 3),
            "evaluated_devices": 0,
            "device_accuracy": None,
            "abandoned_attempts": 0,
            "elapsed_s": self._elapsed(),
            "fedbuff": record.summary(),
        }
        applied = [
            {**u.to_json(self.start_round), "file": name if self.config.keep_updates else None}
            for name, u in zip(names, record.applied, strict=True)
        ]
        self._commit(model, {**fields, "applied": applied})
        self.final_version = version
        self._schedule_judging(version, model, fields)

    def _elapsed(self) -> float:
        return round(self._elapsed_before + time.monotonic() - self._started, 3)

    def _complete(self, arrays: ArrayRecord) -> RoundModel:
        final = self.store.build(arrays_to_parameters(arrays), version=self.final_version)
        self.publish(final)  # the last round's committed model, never another one
        path = self.run_dir.write_final_model(final.data)
        crash_points.reached("after-final", self.final_version)
        log.info("run finished: %s (sha256 %s)", path, final.sha256[:12])
        return final

    # -- committing ---------------------------------------------------------------------------

    def publish(self, model: RoundModel) -> None:
        """Make sure ``model`` is committed before anything names its version to a device.

        The first time a version is published its round is committed: the model file, then its
        commit record, each written atomically and durably. Publishing it again is free; a
        different model under a committed version is refused (RunDirectoryError), since a device
        may already hold the first one. The commit record keeps what the round's exchanges
        yielded so far, for a round judged only after a restart.
        """
        exchanges = [s for s in self._history() if s.round == model.version]
        fields = _round_fields(exchanges, sum(s.seconds for s in exchanges))
        self._commit(model, {**fields, "elapsed_s": self._elapsed()})

    def _commit(self, model: RoundModel, fields: dict) -> bool:
        """Commit ``model`` as its version (see :meth:`publish`); False if it already was."""
        with self._commit_lock:
            committed = self._committed.get(model.version)
            if committed == model.sha256:
                return False
            if committed is not None:
                raise RunDirectoryError(
                    f"model version {model.version} is committed as sha256 {committed[:12]}...; "
                    f"refusing to publish another model ({model.sha256[:12]}...) under it"
                )
            crash_points.reached("after-aggregate", model.version)
            self.run_dir.write_round_model(model.version, model.data)
            crash_points.reached("after-model-file", model.version)
            self.run_dir.append_commit(
                {
                    "round": model.version,
                    "model_sha256": model.sha256,
                    "size_bytes": len(model.data),
                    **fields,
                }
            )
            self._committed[model.version] = model.sha256
            self._committed_at[model.version] = fields.get("elapsed_s")
            crash_points.reached("after-commit", model.version)
            return True

    # -- per round ----------------------------------------------------------------------------

    def _after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Flower's evaluate_fn: commit the model that will be shipped next, have it judged.

        It runs before the strategy configures the next round, so the model is durable before
        any task can name it (the device grid commits it even earlier when evaluate tasks ship
        it). Judging (reference interpreter on the held-out set) runs on one background thread,
        overlapping the next round; metrics lines still come out in round order, and all of them
        are written before ``run`` returns.
        """
        if self.resume_after is not None and server_round == 0:
            return  # Flower's "initial" evaluation is the committed round, recorded already
        server_round += self.start_round
        start = time.monotonic()
        model = self.store.build(arrays_to_parameters(arrays), version=server_round)
        exchanges = [s for s in self._history() if s.round == server_round]
        seconds = sum(s.seconds for s in exchanges) + time.monotonic() - start
        fields = {**_round_fields(exchanges, seconds), "elapsed_s": self._elapsed()}
        self._commit(model, fields)
        # the time the model was committed, which may have been earlier (evaluate tasks)
        fields["elapsed_s"] = self._committed_at.get(server_round, fields["elapsed_s"])
        self._schedule_judging(server_round, model, fields)

    def _schedule_judging(self, server_round: int, model: RoundModel, fields: dict) -> None:
        if not self._judge_in_background:
            self._deferred.append((server_round, model, fields))
            if self._history():  # the runtime is up: nothing will fork beside the judge now
                self._judge_deferred()
            return
        self._judgements.append(self._judge.submit(self._judge_round, server_round, model, fields))

    def _judge_committed(self) -> None:
        """Judge the rounds committed before a restart but not judged, first and in order."""
        for commit in self._unjudged:
            log.info("round %d was committed but not judged before the restart; judging it",
                     commit["round"])  # fmt: skip
            self._schedule_judging(*self._committed_round(commit))
        self._unjudged = []

    def _committed_round(self, commit: dict) -> tuple[int, RoundModel, dict]:
        round_number = int(commit["round"])
        data = self.run_dir.round_model(round_number).read_bytes()  # checked on opening
        blank = {**_round_fields([], 0.0), "elapsed_s": None, "fedbuff": None}
        fields = {k: commit.get(k, blank[k]) for k in COMMITTED_FIELDS}
        return round_number, RoundModel.from_bytes(round_number, data), fields

    def _judge_deferred(self) -> None:
        while self._deferred:
            self._judge_round(*self._deferred.pop(0))

    def _judge_round(self, server_round: int, model: RoundModel, fields: dict) -> RoundRecord:
        # Judge the bytes exactly as a device receives them.
        judged = ReferenceInterpreter(spec_from_bytes(model.data), self.model_name)
        crash_points.reached("mid-judging", server_round)
        loss, accuracy = judged.evaluate(
            self.eval_data.x_test, self.eval_data.y_test, self.probabilities
        )
        record = RoundRecord(
            round=server_round,
            test_accuracy=round(accuracy, 6),
            test_loss=round(loss, 6),
            model_sha256=model.sha256,
            **fields,
        )
        crash_points.reached("before-metrics", server_round)
        self.run_dir.append_metrics(record.to_json())
        crash_points.reached("after-metrics", server_round)
        self.records.append(record)
        log.info(
            "round %d: test accuracy %.4f, loss %.4f (%d/%d devices reported, %d examples)",
            server_round, accuracy, loss, record.devices_reported, record.devices_sampled,
            record.examples,
        )  # fmt: skip
        if self.on_round is not None:
            self.on_round(record)
        return record


def _update_name(index: int, node_id: int) -> str:
    """The file (without .npz) an applied update is kept in: its place in the buffer, its node."""
    return f"{index:02d}-node-{node_id}"


def _round_fields(exchanges: list[ExchangeStats], seconds: float) -> dict:
    """A round's RoundRecord fields from its exchanges (a kind without one counts nothing)."""
    train = next((s for s in exchanges if s.kind == "train"), ExchangeStats("train", 0))
    evaluate = next((s for s in exchanges if s.kind == "evaluate"), ExchangeStats("evaluate", 0))
    return {
        "devices_sampled": train.sampled,
        "devices_reported": train.reported,
        "devices_failed": train.failed,
        "examples": train.examples,
        "seconds": round(seconds, 3),
        "evaluated_devices": evaluate.reported,
        "device_accuracy": evaluate.accuracy,
        "abandoned_attempts": train.abandoned,
    }
