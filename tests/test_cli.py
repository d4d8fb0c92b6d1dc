import subprocess
import sys

import pytest

from fashsim.app import cli
from fashsim.data import fashion_mnist


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fashsim", *args], capture_output=True, text=True, env=env)


def test_data_check_and_where():
    result = run_cli("data", "--check")
    assert result.returncode == 0
    assert "train: 60000 images" in result.stdout and "test: 10000 images" in result.stdout
    where = run_cli("data", "--where")
    assert where.stdout.strip() == str(fashion_mnist.find_fashion_mnist())


def test_the_command_line_loads_pytorch_only_for_commands_that_need_it():
    # every command's flags are listed without importing torch (about 1.5 s on a small machine)
    code = "import sys; from fashsim.app import cli; cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_missing_data_is_a_clean_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASHSIM_DATA", raising=False)
    monkeypatch.setenv("FASHSIM_HOME", str(tmp_path))
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    assert cli.main(["data", "--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fashsim: error: Fashion-MNIST was not found") and "Traceback" not in err


def test_run_failure_exit_code_names_notebook(tmp_path, monkeypatch, capsys):
    assert cli.main(["run", "--profile", "smoke", "--only", "no_such_notebook"]) == 1
    assert "'no_such_notebook': no such notebook" in capsys.readouterr().err


def test_usage_errors_exit_2():
    result = run_cli("run", "--profile", "enormous")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert run_cli("run", "-p", "nodots").returncode == 2


def test_values_that_cannot_work_are_refused_in_one_line(tmp_path, capsys):
    from fashsim.data.fashion_mnist import load_train_val

    for argv, said in (
        (["train", "--epochs", "0", "--out", str(tmp_path / "m")], "epochs, embedding_dim and val_every must be ≥ 1"),
        (["train", "--max-seconds", "-1", "--out", str(tmp_path / "m")], "max_seconds must be > 0"),
        (["data", "--check", "--path", str(tmp_path / "nowhere")], "not found in the folder given"),
        (["train", "--patience", "0", "--out", str(tmp_path / "m")], "patience must be ≥ 1"),
        (["train", "--val-max-items", "1", "--out", str(tmp_path / "m")], "val_max_items must be ≥ 20"),
        (["embed-shards", "--batch-size", "-1", "--out", str(tmp_path / "s")], "--batch-size must be ≥ 1"),
        (["search", "x.png", "--model", str(tmp_path / "m")], "no model at"),
    ):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert not (tmp_path / "m").exists()
    for usage in (["index", "--max-per-split", "0"], ["search", "x.png", "-k", "0"]):
        with pytest.raises(SystemExit):  # argparse: a usage error, exit 2
            cli.main(usage)
    assert not (tmp_path / "s.shards").exists()  # refused before any shard was written
    with pytest.raises(ValueError, match="between 0 and 1"):
        load_train_val(val_fraction=0)


def test_train_seed_is_the_models_not_the_splits(tmp_path, monkeypatch):
    # `fashsim train --seed 1` trains on the course's split, as notebook 02 with seed = 1 does;
    # only --val-fraction asks for another split
    import fashsim.train as training

    seen = {}

    def fake_train(config, train_set, val_set, out, resume):
        seen.update(seed=config.seed, sizes=(len(train_set), len(val_set)), labels=train_set.labels[:50].tolist())
        raise cli.FashsimError("stop here")

    monkeypatch.setattr(training, "train", fake_train)
    course_train, course_val = fashion_mnist.load_train_val()
    assert cli.main(["train", "--seed", "1", "--out", str(tmp_path / "m")]) == 1
    assert seen["seed"] == 1 and seen["sizes"] == (len(course_train), len(course_val))
    assert seen["labels"] == course_train.labels[:50].tolist()
    assert cli.main(["train", "--val-fraction", "0.2", "--out", str(tmp_path / "m")]) == 1
    assert seen["sizes"] == (48_000, 12_000)
