"""The async-vs-sync benchmark's reading of metrics.jsonl and its two comparisons."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "async_vs_sync.py"
_spec = importlib.util.spec_from_file_location("async_vs_sync", BENCH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["async_vs_sync"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def _write(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_read_curve_skips_unjudged_and_half_written_lines(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    _write(
        metrics,
        [
            {"round": 0, "elapsed_s": None, "test_accuracy": 0.1},
            {"round": 2, "elapsed_s": 9.5, "test_accuracy": 0.8},
            {"round": 1, "elapsed_s": 4.0, "test_accuracy": 0.7},
            {"round": 3, "elapsed_s": 12.0, "test_accuracy": None},
        ],
        tail='{"round": 4, "elaps',
    )
    curve = bench.read_curve(metrics)
    assert [(p.step, p.elapsed_s, p.accuracy) for p in curve] == [(1, 4.0, 0.7), (2, 9.5, 0.8)]
    assert bench.read_curve(tmp_path / "absent.jsonl") == []


def test_first_at_or_above_and_accuracy_at_equal_wall_time() -> None:
    curve = [bench.Point(1, 10.0, 0.90), bench.Point(2, 20.0, 0.96), bench.Point(3, 30.0, 0.94)]
    assert bench.first_at_or_above(curve, 0.95).step == 2
    assert bench.first_at_or_above(curve, 0.96).step == 2  # at the target counts
    assert bench.first_at_or_above(curve, 0.97) is None
    # the newest model committed by that time, even if an earlier one was better
    assert bench.accuracy_at(curve, 35.0).step == 3
    assert bench.accuracy_at(curve, 29.9).step == 2
    assert bench.accuracy_at(curve, 9.9) is None
