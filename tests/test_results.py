"""The tidy results table: appends add columns, `replace` swaps a point's rows, bad rows are refused."""

import pytest

from study.results import append_rows, read_results


def test_append_adds_rows_and_columns(tmp_path):
    path = tmp_path / "r.csv"
    append_rows(path, [{"metric": "a", "value": 1.0}])
    append_rows(path, [{"metric": "b", "value": 2.0, "seed": 3}])
    frame = read_results(path)
    assert frame.metric.tolist() == ["a", "b"] and frame.seed.isna().tolist() == [True, False]


def test_replace_drops_only_the_matching_point(tmp_path):
    path = tmp_path / "r.csv"
    append_rows(path, [{"sweep": "s", "point": "p1", "metric": "knn", "value": 0.1},
                       {"sweep": "s", "point": "p2", "metric": "knn", "value": 0.2},
                       {"sweep": "t", "point": "p1", "metric": "knn", "value": 0.3}])
    append_rows(path, [{"sweep": "s", "point": "p1", "metric": "knn", "value": 0.9}],
                replace={"sweep": "s", "point": "p1"})
    frame = read_results(path)
    got = sorted(zip(frame.sweep, frame.point, frame.value))
    assert got == [("s", "p1", 0.9), ("s", "p2", 0.2), ("t", "p1", 0.3)]


def test_rows_without_metric_are_refused_and_file_untouched(tmp_path):
    path = tmp_path / "r.csv"
    append_rows(path, [{"metric": "a", "value": 1.0}])
    before = path.read_bytes()
    with pytest.raises(ValueError, match="metric"):
        append_rows(path, [{"value": 2.0}])
    assert path.read_bytes() == before
