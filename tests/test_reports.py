"""Committed study reports: rebuilt from the results table alone, and a rerun changes only the numbers."""

import itertools
import json
import re
import shutil
import textwrap
from pathlib import Path

import pandas as pd

from study.cli import main
from study.studies.reports import scrub_notebook

REPORT = textwrap.dedent('''\
    # %% tags=["parameters"]
    results = ""
    sweep = ""

    # %%
    from pathlib import Path
    import pandas as pd
    table = pd.read_csv(results)
    print("read", Path(results).resolve())  # an absolute path in an output, to be made relative
    table
''')


def _study(root):
    root.mkdir()
    (root / "report.py").write_text(REPORT)
    (root / "base.yaml").write_text("objective: ls\n")
    (root / "results.csv").write_text("metric,objective,value\nknn_top1,ls,0.5\nknn_top1,cimle,0.75\n")
    (root / "tiny.yaml").write_text(textwrap.dedent('''\
        name: tiny
        config: base.yaml
        run_notebook: missing.py
        report_notebook: report.py
        results: results.csv
        grid:
          mask.ratio: [0.5]
    '''))
    return root


def _without_numbers(text):
    return re.sub(r"\s+", " ", re.sub(r"\d+(\.\d+)?", "#", text))


def _rebuild(root, monkeypatch):
    monkeypatch.chdir(root)  # the sweep's root is the working directory, as for `make reports`
    assert main(["sweep", "tiny.yaml", "--report-only"]) == 0
    return (root / "reports" / "tiny.ipynb").read_text()


def test_report_only_is_stable_across_reruns_and_machines(tmp_path, monkeypatch):
    import nbformat

    first = _rebuild(_study(tmp_path / "a"), monkeypatch)
    nbformat.validate(nbformat.reads(first, as_version=4))
    assert str(tmp_path) not in first
    for volatile in ("papermill", "start_time", "duration", "iopub", "\"execution\"", "\"version\""):
        assert volatile not in first, volatile
    assert "read results.csv" in first and "0.75" in first
    assert [p.name for p in (tmp_path / "a" / "runs" / "tiny").iterdir()] == ["report.ipynb"]  # no point ran

    # the same table elsewhere (another clone, another time): the same bytes
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("reports", "runs"))
    assert _rebuild(tmp_path / "b", monkeypatch) == first

    # a changed number changes the report only in numbers (and the column widths that fit them)
    csv = tmp_path / "b" / "results.csv"
    csv.write_text(csv.read_text().replace("0.75", "0.625"))
    second = _rebuild(tmp_path / "b", monkeypatch)
    assert second != first and "0.625" in second
    assert _without_numbers(second) == _without_numbers(first)


def test_report_without_results_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    root = _study(tmp_path / "a")
    (root / "results.csv").unlink()
    monkeypatch.chdir(root)
    assert main(["sweep", "tiny.yaml", "--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "run the sweep first" in err
    assert not (root / "reports").exists()


def test_scrub_keeps_content_and_drops_run_details(tmp_path):
    nb = {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                     "language_info": {"name": "python", "version": "3.11.9"},
                     "papermill": {"start_time": "2025-01-01T00:00:00", "input_path": str(tmp_path / "x.ipynb")}},
        "cells": [{
            "cell_type": "code", "id": "f3c1a9e0", "execution_count": 1, "source": [f"p = '{tmp_path}/r.csv'"],
            "metadata": {"tags": ["parameters"], "papermill": {"duration": 1.2},
                         "execution": {"iopub.status.busy": "2025-01-01T00:00:01"}},
            "outputs": [{"output_type": "stream", "name": "stdout", "text": [f"read {tmp_path}/r.csv\n"]}],
        }],
    }
    out = scrub_notebook(nb, tmp_path)
    assert out["metadata"] == {"kernelspec": nb["metadata"]["kernelspec"], "language_info": {"name": "python"}}
    (cell,) = out["cells"]
    assert cell["id"] == "cell-0" and cell["metadata"] == {"tags": ["parameters"]}
    assert cell["source"] == ["p = 'r.csv'"] and cell["outputs"][0]["text"] == ["read r.csv\n"]
    assert cell["execution_count"] == 1 and nb["cells"][0]["id"] == "f3c1a9e0"  # the input is left alone
    json.dumps(out)


REPO = Path(__file__).resolve().parents[1]


def _in100_rows(objectives, ratios, seeds, epochs):
    """Rows shaped like an in100 sweep's (k-NN, linear probe and finetune, two pools) run with
    ``random_baseline: once_per_seed``: the random-init rows only at each seed's first point."""
    rows = []
    for o, (objective, ratio, seed) in enumerate(itertools.product(objectives, ratios, seeds)):
        first_of_seed = (objective, ratio) == (objectives[0], ratios[0])
        point = f"{objective}-{ratio}_s{seed}"
        for e, epoch in enumerate(epochs):
            last = epoch == epochs[-1]
            setting = {"objective": objective, "mask_kind": "random", "mask_ratio": ratio, "mask_filter": None,
                       "cimle_select": "image", "seed": seed, "epochs": epoch, "config_epochs": epochs[-1],
                       "train_seconds": epoch * (13.0 if objective == "cimle" else 10.0), "dataset": "imagenet100",
                       "sweep": "in100", "point": point}
            for protocol, metric in [("knn", "knn_top1"), ("knn", "knn_seconds"), ("linear", "linear_top1"),
                                     ("finetune", "finetune_top1"), ("finetune", "finetune_seconds")]:
                for pool in ("cls", "mean"):
                    value = 0.4 + 0.01 * (o + e + seed) + (0.05 if pool == "mean" else 0.0)
                    rows.append({**setting, "protocol": protocol, "pool": pool, "encoder": "pretrained",
                                 "metric": metric, "value": value})
                    if first_of_seed and last:
                        rows.append({**setting, "protocol": protocol, "pool": pool, "encoder": "random",
                                     "metric": metric, "value": 0.1 + 0.01 * seed})
    return pd.DataFrame(rows)


def _report_of(root, monkeypatch, name, notebook, table):
    table.to_csv(root / f"{name}.csv", index=False)
    (root / f"{name}.yaml").write_text(textwrap.dedent(f'''\
        name: {name}
        config: base.yaml
        run_notebook: missing.py
        report_notebook: {REPO / "notebooks" / notebook}
        results: {name}.csv
        grid:
          mask.ratio: [0.75]
        report_parameters:
          figures: figures
    '''))
    monkeypatch.chdir(root)
    assert main(["sweep", f"{name}.yaml", "--report-only"]) == 0
    nb = json.loads((root / "reports" / f"{name}.ipynb").read_text())
    outputs = [out for cell in nb["cells"] if cell["cell_type"] == "code" for out in cell["outputs"]]
    assert not [out for out in outputs if out["output_type"] == "error"]
    assert (root / "figures" / f"{name}.png").is_file()
    return "".join("".join(out.get("text", [])) for out in outputs)


def test_in100_reports_render_with_one_random_baseline_per_seed(tmp_path, monkeypatch):
    tmp_path.joinpath("base.yaml").write_text("objective: ls\n")
    strength = _report_of(tmp_path, monkeypatch, "mask_strength_in100", "mask_strength.py",
                          _in100_rows(["ls", "cimle"], [0.75, 0.9], [0, 1], [800]))
    assert "random init" in strength and "cIMLE - LS" in strength
    # the random-init rows of two seeds, each counted once: 10.0 and 11.0 -> mean 10.5
    assert "10.5 ± 0.7 (n=2)" in strength
    assert (tmp_path / "figures" / "mask_strength_in100_paired.png").is_file()
    efficiency = _report_of(tmp_path, monkeypatch, "efficiency_in100", "efficiency.py",
                            _in100_rows(["ls", "cimle"], [0.9], [0, 1], [50, 100, 800]))
    assert "least squares" in efficiency and "cIMLE" in efficiency


def test_report_failures_name_the_notebook_and_the_table(tmp_path, monkeypatch, capsys):
    root = _study(tmp_path / "a")
    monkeypatch.chdir(root)
    table = root / "results.csv"
    good = table.read_text()
    table.write_text(good + "knn_top1,ls,oops\n")  # a hand edit: text in the value column
    assert main(["sweep", "tiny.yaml", "--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(root / "report.py") in err and f"{table}:4: results table column value holds 'oops'" in err
    assert not (root / "reports").exists() and not (root / "runs").exists()  # no kernel started
    table.write_text(good)
    (root / "report.py").write_text(REPORT + "\nraise ValueError('no such column')\n")
    assert main(["sweep", "tiny.yaml", "--report-only"]) == 1  # a failing cell: maybe the notebook's own bug
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"report {root / 'report.py'} failed on {table}: ValueError: no such column" in err
    assert not (root / "reports").exists()


def test_report_only_from_another_folder_uses_the_repository_of_the_sweep_file(tmp_path, monkeypatch):
    repo = _study(tmp_path / "repo")
    (repo / "experiments" / "sweeps").mkdir(parents=True)
    (repo / "tiny.yaml").rename(repo / "experiments" / "sweeps" / "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "repo/experiments/sweeps/tiny.yaml", "--report-only"]) == 0
    assert "read results.csv" in (repo / "reports" / "tiny.ipynb").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
