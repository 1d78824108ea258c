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


# --------------------------------------------------------------------------- a table rows cannot go to


def _bad_tables(tmp_path):
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("metric,value\na,1\nb,2,3,4\n")
    unrelated = tmp_path / "unrelated.csv"
    unrelated.write_text("name,score\nx,1\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    return {"folder": folder, "binary": binary, "ragged": ragged, "unrelated": unrelated,
            "below a file": afile / "results.csv"}


@pytest.mark.parametrize("kind", ["folder", "binary", "ragged", "unrelated", "below a file"])
def test_check_table_refuses_what_rows_cannot_be_appended_to(tmp_path, kind):
    from study.results import ResultsTableError, check_table

    path = _bad_tables(tmp_path)[kind]
    with pytest.raises(ResultsTableError, match=str(path.parent if kind == "below a file" else path)):
        check_table(path)


def test_check_table_accepts_new_empty_blank_and_results_tables(tmp_path):
    from study.results import check_table

    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "blank.csv").write_text("\n  \n")
    append_rows(tmp_path / "table.csv", [{"metric": "a", "value": 1.0}])
    for name in ("new/sub/r.csv", "empty.csv", "blank.csv", "table.csv"):
        check_table(tmp_path / name)
    append_rows(tmp_path / "blank.csv", [{"metric": "a", "value": 1.0}])
    assert read_results(tmp_path / "blank.csv").metric.tolist() == ["a"]


def test_unrelated_table_is_refused_not_merged(tmp_path):
    path = _bad_tables(tmp_path)["unrelated"]
    before = path.read_bytes()
    with pytest.raises(ValueError, match="not a results table"):
        append_rows(path, [{"metric": "a", "value": 1.0}])
    assert path.read_bytes() == before
