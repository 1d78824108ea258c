"""``submit``'s SLURM options (account, qos, constraint, any --slurm-option) and its cpus per task reach the
batch script that sbatch gets (the fake SLURM of tests/fake_slurm)."""

from test_submit import SETS, _result, _submit, slurm  # noqa: F401 - slurm is the fixture

from conftest import one_error_line
from study.cli import main as cli_main


def _script(out, job_id: str) -> list[str]:
    return (out / "slurm" / job_id / f"{job_id}_submission.sh").read_text().splitlines()


def test_slurm_options_and_cpus_from_the_workers_reach_the_batch_script(slurm, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    job, _ = _submit(capsys, out, "--account", "proj42", "--qos", "high", "--constraint", "a100&ib",
                     "--slurm-option", "mail-type=END", "--slurm-option", "reservation=gpu day",
                     "--set", "data.num_workers=3")
    lines = _script(out, job)
    for expected in ("#SBATCH --account=proj42", "#SBATCH --qos=high", "#SBATCH --constraint='a100&ib'",
                     "#SBATCH --mail-type=END", "#SBATCH --reservation='gpu day'", "#SBATCH --cpus-per-task=4"):
        assert expected in lines, (expected, lines)
    assert _result(slurm, out / "slurm" / "%j", job)["epoch"] == 0  # the job itself still runs


def test_cpus_per_task_can_be_set(slurm, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    job, _ = _submit(capsys, out, "--cpus-per-task", "7")
    assert "#SBATCH --cpus-per-task=7" in _script(out, job)


def test_a_slurm_option_without_a_value_is_one_error_line(slurm, tmp_path, capsys):  # noqa: F811
    code = cli_main(["submit", "--out", str(tmp_path / "run"), *SETS, "--slurm-option", "mail-type"])
    one_error_line(capsys, code, "--slurm-option", "KEY=VALUE", "mail-type")
    assert not slurm.exists()
