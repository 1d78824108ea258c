"""The toy: analytic floor, shared means at s = 1, hidden class signal, and the script end to end."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from toy.conditionals import ToyConfig, ToyTask
import toy.regression_to_mean as rtm
from toy.regression_to_mean import CSV_NAME, SUMMARY_NAME, energy_distance, linear_probe_accuracy, main
from study.figures.toy import FIGURE_NAME

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task():
    return ToyTask()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("s", [0.0, 0.3, 1.0])
def test_bayes_floor_matches_monte_carlo(task, s):
    batch = task.sample(100_000, s, gen(1))
    mc = (batch.y - task.conditional_mean(batch, s)).pow(2).mean().item()  # E||y - E[y|x]||^2 / dy
    assert mc == pytest.approx(task.bayes_floor(s), rel=0.01)
    # and no constant does better at s = 1: the floor is what LS can reach
    if s == 1.0:
        centred = batch.y - task.aux_means[batch.v]  # only v's shift is left to predict
        assert centred.pow(2).mean().item() == pytest.approx(task.bayes_floor(s), rel=0.01)


def test_class_means_equal_at_s1_and_differ_at_s0(task):
    def empirical_means(s):
        batch = task.sample(80_000, s, gen(2))
        return torch.stack([batch.y[batch.c == c].mean(0) for c in range(task.config.n_classes)])  # [C, dy]

    at1, at0 = empirical_means(1.0), empirical_means(0.0)
    assert torch.cdist(at1, at1).max() < 0.1  # mode radii are <= 2: 0.1 is a few standard errors
    gaps = torch.cdist(at0, at0).fill_diagonal_(float("inf")).min(dim=1).values
    assert gaps.min() > 0.8 * task.config.mean_gap  # the closest pair differs by mean_gap
    assert gaps.max() > 2 * task.config.mean_gap  # ... and the gaps grow (graded)
    # ... while the distributions differ at s = 1: per-class second moments along each mode direction
    batch = task.sample(80_000, 1.0, gen(3))
    spread = torch.stack([(batch.y[batch.c == c] @ task.mode_dirs.t()).pow(2).mean(0) for c in range(4)])
    assert torch.allclose(spread.diagonal(), task.radii.pow(2) + 0.01, rtol=0.05)


def test_class_is_hidden_from_random_projections_but_linearly_decodable(task):
    train, test = task.sample(800, 1.0, gen(4), balanced=True), task.sample(800, 1.0, gen(5), balanced=True)
    full = linear_probe_accuracy(train.x, train.c, test.x, test.c, 4)
    proj = torch.randn(task.config.dx, 8, generator=gen(6))
    random8 = linear_probe_accuracy(train.x @ proj, train.c, test.x @ proj, test.c, 4)
    assert full > 0.99  # x determines c exactly, linearly
    assert random8 < 0.45  # chance is 0.25


def test_energy_distance_is_near_zero_for_equal_distributions():
    a, b = torch.randn(500, 3, generator=gen(7)), torch.randn(500, 3, generator=gen(8))
    assert abs(energy_distance(a, b).item()) < 0.02
    assert energy_distance(a, b + 1.0).item() > 0.5


def test_config_validates():
    with pytest.raises(ValueError, match="dy must be >= n_classes"):
        ToyConfig(dy=4)
    with pytest.raises(ValueError, match="mean_gap"):
        ToyConfig(mean_gap_ratio=0.5)
    with pytest.raises(ValueError, match="mask strength s must be in"):
        ToyTask().sample(8, 1.5, gen())


def test_script_end_to_end_and_plot_only(tmp_path, monkeypatch):
    for name, size in [("PROBE_TRAIN", 200), ("PROBE_TEST", 200), ("TEST_SIZE", 200), ("ENERGY_SAMPLES", 50),
                       ("MEAN_SAMPLES", 4)]:  # small evaluation sets: this test checks plumbing, not numbers
        monkeypatch.setattr(rtm, name, size)
    out, figs = tmp_path / "results", tmp_path / "figures"
    frame = main(["--steps", "20", "--seeds", "1", "--strengths", "0", "1", "--k", "3",
                  "--out", str(out), "--figures", str(figs), "--no-progress"])
    table = pd.read_csv(out / CSV_NAME)
    assert {"objective", "k", "mask_strength", "seed", "metric", "value"} <= set(table.columns)
    assert {"test_loss", "bayes_floor", "probe_accuracy", "probe_accuracy_untrained",
            "energy_distance", "mode_accuracy", "axis_accuracy", "amplitude"} <= set(table.metric)
    assert set(table.objective) == {"ls", "cimle"} and set(table.mask_strength) == {0.0, 1.0}
    assert len(table) == len(frame) and table.value.notna().all()
    assert "acceptance:" in (out / SUMMARY_NAME).read_text()
    pngs = {fmt: (figs / f"{FIGURE_NAME}.{fmt}").read_bytes() for fmt in ("png", "pdf")}

    # --plot-only redraws from the CSV, no training, byte-identical; also as a file-path script
    for fmt in pngs:
        (figs / f"{FIGURE_NAME}.{fmt}").unlink()
    subprocess.run([sys.executable, str(ROOT / "toy" / "regression_to_mean.py"), "--plot-only",
                    "--out", str(out), "--figures", str(figs)], check=True, cwd=tmp_path, capture_output=True)
    for fmt, data in pngs.items():
        assert (figs / f"{FIGURE_NAME}.{fmt}").read_bytes() == data


def test_plot_only_without_a_table_is_one_line_naming_the_fix(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "toy" / "regression_to_mean.py"), "--plot-only",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: no toy results at") and "without --plot-only" in done.stderr


def test_channel_adds_noise_of_the_given_std_and_zero_is_clean():
    from toy.models import Encoder, channel

    h = Encoder(8, 6)(torch.randn(4000, 8))
    assert h.pow(2).mean(dim=1).sub(1).abs().max() < 0.05  # fixed power (up to LayerNorm eps): mean square 1 per dim
    assert torch.equal(channel(h, 0.0, gen()), h)
    noisy = channel(h, 0.5, gen(1))
    assert (noisy - h).std().item() == pytest.approx(0.5, rel=0.05)


def _frame(ls_probe):
    rows = []
    for s, acc in ls_probe.items():
        for obj, value in (("ls", acc), ("cimle", 0.95)):
            metrics = {"probe_accuracy": value, "probe_accuracy_untrained": 0.27, "test_loss": 0.2,
                       "bayes_floor": 0.2, "energy_distance": 0.1}
            rows += [{"objective": obj, "mask_strength": s, "seed": 0, "metric": m, "value": v}
                     for m, v in metrics.items()]
    return pd.DataFrame(rows)


def test_graded_criterion_fails_on_a_knife_edge_and_passes_on_a_graded_fall():
    def graded(frame):
        return [ok for text, ok in rtm.acceptance(frame) if text.startswith("graded")][0]

    assert not graded(_frame({0.0: 1.0, 0.5: 1.0, 0.75: 1.0, 0.9: 1.0, 1.0: 0.27}))
    assert not graded(_frame({0.0: 1.0, 0.5: 0.97, 0.75: 0.6, 0.9: 0.3, 1.0: 0.27}))  # one point only
    assert graded(_frame({0.0: 1.0, 0.5: 0.93, 0.75: 0.8, 0.9: 0.5, 1.0: 0.27}))


def test_the_samples_check_judges_the_axis_and_not_the_nearest_true_mode():
    def check(axis):
        values = {"ls": (0.25, 0.25, 0.0), "cimle": (0.7, axis, 0.46)}  # mode accuracy, axis accuracy, amplitude
        samples = pd.DataFrame([{"objective": obj, "mask_strength": 1.0, "seed": 0, "metric": m, "value": v}
                                for obj, row in values.items()
                                for m, v in zip(("mode_accuracy", "axis_accuracy", "amplitude"), row)])
        frame = pd.concat([_frame({1.0: 0.27}), samples])
        frame = frame.assign(k=frame.objective.map({"ls": 1, "cimle": 2}), n_classes=4)
        (text, ok), = [(text, ok) for text, ok in rtm.acceptance(frame) if "samples" in text]
        assert "mode axis" in text and "nearest-of-2: 0.50" in text
        return ok

    assert check(axis=0.93) and not check(axis=0.85)


def test_mode_accuracy_tells_the_right_class_s_samples_from_a_class_mixture():
    """True samples name their class; samples of p(y | v) (any class's modes) and the mean at s = 1 do not."""
    task = ToyTask()
    g = gen(3)
    c, v = task.sample_classes(2000, g), task.sample_aux(2000, g)
    for s in (0.0, 1.0):
        right = task.nearest_mode_class(task.sample_y(c, v, s, g), v, s) == c
        mixture = task.nearest_mode_class(task.sample_y(task.sample_classes(2000, g), v, s, g), v, s) == c
        assert right.float().mean() > 0.99 and abs(mixture.float().mean() - 0.25) < 0.05
    mean = task.class_means(1.0)[c] + task.aux_means[v]
    assert abs((task.nearest_mode_class(mean, v, 1.0) == c).float().mean() - 0.25) < 0.05


def test_axis_and_amplitude_judge_true_samples_right_and_a_mixture_by_chance():
    task = ToyTask()
    g = gen(5)
    c, v = task.sample_classes(2000, g), task.sample_aux(2000, g)
    for s in (0.0, 1.0):
        y = task.sample_y(c, v, s, g)
        assert (task.axis_class(y, v, s) == c).float().mean() > 0.99
        assert task.mode_amplitude(y, v, c, s).mean().item() == pytest.approx(1.0, abs=0.05)
        mixture = task.sample_y(task.sample_classes(2000, g), v, s, g)
        assert abs((task.axis_class(mixture, v, s) == c).float().mean() - 0.25) < 0.05
    # the axis ignores how far out a sample lies: drawn in to a tenth of the radius, still its class's
    centre = task.class_means(0.0)[c] + task.aux_means[v]
    shrunk = centre + 0.1 * (task.sample_y(c, v, 0.0, g) - centre)
    assert (task.axis_class(shrunk, v, 0.0) == c).float().mean() > 0.99
    # at s = 1 every axis passes through n_v: the nearest axis is the largest |cos| with u_c
    y = task.aux_means[v] + torch.randn(2000, task.config.dy, generator=g)
    offsets = y - task.aux_means[v]
    cosine = (offsets @ task.mode_dirs.t()).abs() / offsets.norm(dim=1, keepdim=True)
    assert torch.equal(task.axis_class(y, v, 1.0), cosine.argmax(1))
    assert abs((task.axis_class(y, v, 1.0) == c).float().mean() - 0.25) < 0.05  # the mean plus blur: chance


def test_half_amplitude_samples_under_blur_lose_the_larger_radii_to_the_nearest_true_mode():
    """The confound the sample diagnostic measures: drawn in to half amplitude and blurred, the largest-radius
    class's samples lie nearer a smaller class's true modes, the smallest class's do not; judged against the
    drawn-in modes the two are alike."""
    task = ToyTask()
    g = gen(7)
    v = task.sample_aux(4000, g)
    accuracy = {}
    for c in (0, 3):
        sign = torch.randint(2, (4000, 1), generator=g).float() * 2 - 1
        y = task.aux_means[v] + 0.5 * task.radii[c] * sign * task.mode_dirs[c] + 0.2 * torch.randn(4000, 12, generator=g)
        accuracy[c] = [(task.nearest_mode_class(y, v, 1.0, amplitude=a) == c).float().mean().item() for a in (1.0, 0.5)]
    assert accuracy[0][0] > 0.95 and accuracy[3][0] < 0.85
    assert min(accuracy[0][1], accuracy[3][1]) > 0.9
    assert abs(accuracy[0][1] - accuracy[3][1]) < abs(accuracy[0][0] - accuracy[3][0]) / 3


def test_nearest_of_k_amplitude_is_where_the_nearest_of_k_loss_of_a_two_mode_sampler_is_least():
    from study.losses import nearest_of_k_amplitude

    g = gen(6)
    y = torch.randint(2, (20_000,), generator=g).float() * 2 - 1  # modes +-1
    amplitudes = torch.linspace(0, 1, 101)
    for k in (1, 2, 3, 8):
        sides = torch.randint(2, (20_000, k), generator=g).float() * 2 - 1  # each sample's mode
        loss = [(y[:, None] - b * sides).pow(2).min(1).values.mean() for b in amplitudes]
        best = amplitudes[int(torch.stack(loss).argmin())].item()
        assert best == pytest.approx(nearest_of_k_amplitude(k), abs=0.03), k


def test_a_grid_without_inner_strengths_says_the_graded_check_needs_the_full_grid():
    frame = _frame({0.0: 1.0, 1.0: 0.27})
    assert not any(text.startswith("graded") for text, _ in rtm.acceptance(frame))
    assert "needs two strengths between 0 and 1" in rtm.report(frame)


def test_sample_diagnostic_judges_true_samples_right_and_a_centred_sampler_as_shrunk(task):
    from toy.sample_diagnostic import _judge, truth

    own = truth(task)
    assert own["mode_accuracy"] > 0.95 and own["axis_accuracy"] > 0.95
    assert own["amplitude"] == pytest.approx(1.0, abs=0.05)
    # a sampler with the right axis at half the radius: the amplitude says so, the axis still names the class
    aux = task.sample_aux(400, gen(3))
    half = task.aux_means[aux] + 0.5 * task.radii[2] * task.mode_dirs[2]  # [400, dy]
    judged = _judge(half, aux, 2, task, k=2)
    assert judged["amplitude"] == pytest.approx(0.5, abs=1e-5)
    assert judged["axis_accuracy"] == 1.0


def test_sample_diagnostic_end_to_end_and_a_bad_out_is_one_line(tmp_path):
    script = ROOT / "toy" / "sample_diagnostic.py"
    done = subprocess.run([sys.executable, str(script), "--k", "2", "--seeds", "1", "--steps", "20",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(tmp_path / "sample_diagnostic.csv")
    assert set(frame.metric) == {"mode_accuracy", "mode_accuracy_clean", "optimum_mode_accuracy", "axis_accuracy",
                                 "amplitude", "predicted_amplitude"}
    assert len(frame) == 4 * 6  # 4 classes x 6 metrics
    assert (tmp_path / "sample_diagnostic.txt").read_text().startswith("cIMLE samples at s = 1")
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = subprocess.run([sys.executable, str(script), "--out", str(blocker / "sub")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: cannot write to --out") and "Traceback" not in bad.stderr


@pytest.mark.parametrize("args, word", [(["--seeds", "0"], "--seeds"), (["--strengths", "2"], "--strengths"),
                                        (["--steps", "many"], "--steps"), (["--nosuch"], "--nosuch")])
def test_a_bad_argument_is_one_error_line(tmp_path, args, word):
    done = subprocess.run([sys.executable, str(ROOT / "toy" / "regression_to_mean.py"), *args, "--out", str(tmp_path)],
                          capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], done.stderr
    assert not list(tmp_path.iterdir())


def test_failed_acceptance_checks_exit_1(tmp_path, monkeypatch, capsys):
    knife_edge = _frame({0.0: 1.0, 0.5: 1.0, 0.75: 1.0, 1.0: 0.27})  # the graded check fails
    monkeypatch.setattr(rtm, "run_grid", lambda *args, **kwargs: knife_edge)
    monkeypatch.setattr(rtm, "plot_toy", lambda frame, out: [])
    assert rtm._cli(["--out", str(tmp_path), "--no-progress"]) == 1
    assert "acceptance check(s) failed: graded" in capsys.readouterr().err
    passing = _frame({0.0: 1.0, 0.5: 0.93, 0.75: 0.8, 1.0: 0.27})
    monkeypatch.setattr(rtm, "run_grid", lambda *args, **kwargs: passing)
    assert [ok for _, ok in rtm.acceptance(passing)] and all(ok for _, ok in rtm.acceptance(passing))
    assert rtm._cli(["--out", str(tmp_path), "--no-progress"]) == 0
    assert rtm._cli(["--plot-only", "--out", str(tmp_path)]) == 0  # redrawing checks nothing
