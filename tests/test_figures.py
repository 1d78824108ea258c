"""Study figures: drawn from a tidy table, byte-identical on rerun; missing results are named, not fatal."""

import itertools

import pandas as pd
import pytest
from pathlib import Path

from study.figures import studies
from study.figures.__main__ import main as figures_main


def _table() -> pd.DataFrame:
    rows = []
    for dataset, objective, ratio, seed, encoder, metric, epochs, block, pool in itertools.product(
            ["mnist"], ["ls", "cimle"], [0.5, 0.9], [0, 1], ["pretrained", "random"],
            ["knn_top1", "linear_top1"], [5, 10], [0, 1], ["cls", "mean"]):
        rows.append(dict(dataset=dataset, mask_kind="random", objective=objective, mask_ratio=ratio, seed=seed,
                         pool=pool,
                         encoder=encoder, metric=metric, epochs=epochs, train_seconds=epochs * 2.0 + seed,
                         noise_block=block, decoder_depth=2,
                         value=0.5 + 0.1 * (objective == "cimle") + 0.01 * seed + 0.001 * epochs))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["mask_strength", "efficiency", "noise_block", "paired_difference"])
def test_study_figure_is_deterministic(tmp_path, kind):
    draw = getattr(studies, f"{kind}_figure")
    first = draw(_table(), tmp_path / "a", name=kind)
    second = draw(_table(), tmp_path / "b", name=kind)
    assert [p.suffix for p in first] == [".png", ".pdf"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_table_reports_mean_and_std_per_ratio():
    table = studies.mask_strength_table(_table())
    cell = table.loc[("mnist", "random", 0.9, "mean"), ("k-NN top-1", "cIMLE")]
    # cIMLE rows: 0.6 + 0.01 * seed + 0.001 * epochs over seeds {0, 1} and epochs {5, 10}
    assert cell.startswith("61.3 ± ")


def test_missing_results_are_named_and_others_still_drawn(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    _table().to_csv(results / "mask_strength_cpu.csv", index=False)
    code = figures_main(["--results", str(results), "--out", str(tmp_path / "figures")])
    err = capsys.readouterr().err
    assert code == 1
    assert "toy_results.csv" in err and "efficiency_cpu.csv" in err
    assert (tmp_path / "figures" / "mask_strength_cpu.png").is_file()
    assert (tmp_path / "figures" / "masks.png").is_file()


def _synthetic_table() -> pd.DataFrame:
    rows = []
    variants = [("ls", "token"), ("cimle", "image"), ("cimle", "token"), ("mvae", "image")]
    for (objective, select), shift, distractor, seed, encoder, pool in itertools.product(
            variants, [0.0, 1.0], [0.75, 1.0], [0, 1], ["pretrained", "random"], ["cls", "mean"]):
        value = 0.9 if encoder == "random" else 0.4 + 0.5 * (select == "token") + 0.1 * shift
        rows.append(dict(objective=objective, cimle_select=select, synthetic_mean_shift=shift, synthetic_cue=2.0,
                         synthetic_distractor=distractor, mask_ratio=0.75, seed=seed, encoder=encoder, pool=pool,
                         metric="linear_top1", value=value + 0.01 * seed))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["synthetic", "tradeoff"])
def test_synthetic_figures_are_deterministic(tmp_path, kind):
    from study.figures import synthetic

    draw = synthetic.synthetic_figure if kind == "synthetic" else synthetic.tradeoff_figure
    first, second = draw(_synthetic_table(), tmp_path / "a"), draw(_synthetic_table(), tmp_path / "b")
    assert [p.suffix for p in first] == [".png", ".pdf"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    labels = synthetic.variant_labels(_synthetic_table())
    assert set(labels) == {"least squares", "cIMLE (image)", "cIMLE (token)", "Masked VAE"}


def test_axis_slice_keeps_one_axis_with_the_others_at_the_default():
    from study.figures import synthetic

    table = _synthetic_table()
    shift = synthetic.axis_slice(table, "synthetic_mean_shift")
    assert set(shift.synthetic_distractor) == {0.75} and set(shift.synthetic_mean_shift) == {0.0, 1.0}
    trade = synthetic.axis_slice(table, "synthetic_distractor")
    assert set(trade.synthetic_mean_shift) == {0.0} and set(trade.synthetic_distractor) == {0.75, 1.0}


def test_synthetic_default_point_is_the_configs():
    from study.config import load_config
    from study.figures.synthetic import DEFAULT_POINT

    cfg = load_config("experiments/configs/synthetic.yaml")
    assert DEFAULT_POINT == {"synthetic_mean_shift": cfg.data.synthetic.mean_shift, "mask_ratio": cfg.mask.ratio,
                             "synthetic_distractor": cfg.data.synthetic.distractor}


def test_figures_draw_text_with_matplotlib_s_own_fonts():
    """A host's DejaVu Sans of another version must not reach the PDFs (their bytes would change)."""
    from pathlib import Path

    import matplotlib
    from matplotlib import font_manager

    import study.figures.common  # noqa: F401  (pins the fonts on import)

    bundled = Path(matplotlib.get_data_path()) / "fonts"
    for weight in ("normal", "bold"):
        found = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight=weight))
        assert Path(found).is_relative_to(bundled), found


def test_the_readme_table_is_the_headline_of_the_committed_tables(tmp_path):
    """The README's results table is generated: headline_markdown of the committed results, verbatim."""
    from study.figures.headline import headline_markdown, headline_rows

    root = Path(__file__).resolve().parents[1]
    rows = headline_rows(root / "results")
    table = headline_markdown(rows)
    assert table in (root / "README.md").read_text()
    assert table == (root / "figures" / "headline.md").read_text()
    toy = rows[rows.rung.str.startswith("toy")].iloc[0]
    assert toy["diff"] == pytest.approx(toy["cimle"] - toy["ls"])  # paired over the same seeds: the means' difference
    assert list(rows.variant) == ["one z per example", "per token", "per image, head", "per token", "per image, head",
                                  "per image"]
    # each cIMLE variant against least squares on its own model: the head at z = 0, or MAE's decoder
    assert list(rows.ls_label)[1:] == ["LS (head at z = 0)"] * 4 + ["LS"]
