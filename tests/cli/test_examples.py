"""`evomerge examples`: every example merge config runs, in a temporary work folder."""

from click.testing import CliRunner

from evomerge.cli.main import main


def test_examples_run_every_example_merge(tmp_path):
    result = CliRunner().invoke(main, ["examples", "--workdir", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    table = result.output.splitlines()
    methods = {line.split()[1] for line in table[1:] if line.endswith(tuple("0123456789"))}
    assert {"ties", "task_arithmetic", "dare_ties", "slerp", "model_stock", "passthrough"} <= methods
    assert (tmp_path / "merged" / "frankenmerge" / "config.json").exists()
