"""The tidy results table: appends add columns, `replace` swaps a point's rows, bad rows are refused."""

import pytest

from study.evaluation.results import append_rows, read_results


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
    from study.evaluation.results import ResultsTableError, check_table

    path = _bad_tables(tmp_path)[kind]
    with pytest.raises(ResultsTableError, match=str(path.parent if kind == "below a file" else path)):
        check_table(path)


def test_check_table_accepts_new_empty_blank_and_results_tables(tmp_path):
    from study.evaluation.results import check_table

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


# --------------------------------------------------------------------------- a table edited by hand

GOOD = "sweep,point,metric,value,seed,epochs\ns,p1,knn_top1,0.5,0,10\ns,p2,knn_top1,0.25,1,10\n"
HAND_EDITS = {  # (the edited table, the line named, a word of the message)
    "short row": (GOOD + "s,p3,knn_top1,0.75\n", 4, "4 fields where the header has 6"),
    "long row": (GOOD + "s,p3,knn_top1,0.75,2,10,extra\n", 4, "7 fields"),
    "text value": (GOOD.replace("0.25", "0.25?"), 3, "column value holds '0.25?'"),
    "text seed": ("\n" + GOOD.replace(",1,10", ",one,10"), 4, "column seed holds 'one'"),
    "no value column": (GOOD.replace(",value,", ",score,"), 1, "lacks column(s) value"),
}


def _readers(path):
    """Every reader of a results table: evaluate's and the sweeps' (the figures and notebooks use read_results)."""
    from study.evaluation.results import check_table, count_stale_rows, point_seconds, points_with_rows

    return {"read_results": lambda: read_results(path), "check_table": lambda: check_table(path),
            "append_rows": lambda: append_rows(path, [{"metric": "a", "value": 1.0}]),
            "points_with_rows": lambda: points_with_rows(path), "point_seconds": lambda: point_seconds(path),
            "count_stale_rows": lambda: count_stale_rows(path, "s", ["p1"])}


@pytest.mark.parametrize("edit", list(HAND_EDITS))
def test_a_hand_edited_table_is_named_by_line_by_every_reader(tmp_path, edit):
    from study.evaluation.results import ResultsTableError
    from study.utils.errors import UserError

    text, line, words = HAND_EDITS[edit]
    path = tmp_path / "r.csv"
    path.write_text(text)
    for name, read in _readers(path).items():
        with pytest.raises(ResultsTableError) as caught:
            read()
        assert isinstance(caught.value, UserError), name
        assert str(caught.value).startswith(f"{path}:{line}: ") and words in str(caught.value), (name, caught.value)
    assert path.read_text() == text  # nothing padded, dropped or rewritten


def test_append_keeps_integer_columns_integers_and_good_rows_unchanged(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text(GOOD)
    append_rows(path, [{"sweep": "s", "point": "p3", "metric": "knn_top1", "value": 1.0}])  # no seed, no epochs
    append_rows(path, [{"sweep": "s", "point": "p4", "metric": "knn_top1", "value": 2.0, "seed": None, "epochs": 5,
                        "knn_k": 20}])
    assert path.read_text().splitlines() == ["sweep,point,metric,value,seed,epochs,knn_k",
                                             "s,p1,knn_top1,0.5,0,10,", "s,p2,knn_top1,0.25,1,10,",
                                             "s,p3,knn_top1,1.0,,,", "s,p4,knn_top1,2.0,,5,20"]
    # rewritten again (a point's rows replaced): the integer columns with gaps stay integers
    append_rows(path, [{"sweep": "s", "point": "p3", "metric": "knn_top1", "value": 3.0, "seed": 7}],
                replace={"sweep": "s", "point": "p3"})
    assert path.read_text().splitlines()[1:] == ["s,p1,knn_top1,0.5,0,10,", "s,p2,knn_top1,0.25,1,10,",
                                                 "s,p4,knn_top1,2.0,,5,20", "s,p3,knn_top1,3.0,7,,"]
    assert read_results(path).value.dtype == "float64"
    # a column the kept rows write as floats stays floats: the kept rows do not change
    floats = tmp_path / "f.csv"
    floats.write_text("metric,value,knn_k\na,1.0,20.0\nb,2.0,\n")
    append_rows(floats, [{"metric": "c", "value": 3.0, "knn_k": 20}])
    assert floats.read_text() == "metric,value,knn_k\na,1.0,20.0\nb,2.0,\nc,3.0,20.0\n"


def test_figures_name_the_broken_line_and_draw_the_rest(tmp_path, monkeypatch, capsys):
    import study.figures.__main__ as figures

    monkeypatch.setattr(figures, "plot_mask_examples", lambda out: [])  # the one figure without a table: not here
    table = tmp_path / "results" / "toy" / "toy_results.csv"
    table.parent.mkdir(parents=True)
    table.write_text("objective,k,mask_strength,seed,metric,value\n"
                     "ls,1,0.0,0,test_loss,0.5\nls,1,0.0,x,test_loss,0.5\n")
    assert figures.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{table}:3: results table column seed holds 'x'" in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: 1 figure(s) not drawn") and "toy" in err.splitlines()[-1]
