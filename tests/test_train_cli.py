"""`dpop train` and `dpop sft` through the CLI, in process: bad data stops the run before anything is
written, and a run can be resumed by naming only its directory."""

import json

from dpop.cli import main


def read_lines(path):
    return path.read_text().splitlines()


def test_a_bad_third_line_stops_the_run_before_anything_is_written(tiny_model_dir, pairs_file, tmp_path, capsys,
                                                                   dpop_cache):
    lines = read_lines(pairs_file)
    broken = json.loads(lines[2])
    broken["chosen"] = 42
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([lines[0], lines[1], json.dumps(broken), *lines[3:]]) + "\n")
    out_dir = tmp_path / "run"

    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out_dir),
                 "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert f"{data.name}:3" in err and "'chosen'" in err, err
    assert "Traceback" not in err
    assert not out_dir.exists()
    assert not dpop_cache.exists()  # not even the model fingerprint: the model was never loaded


def test_sft_then_resume_by_run_dir_alone(tiny_model_dir, pairs_file, tmp_path, capsys, dpop_cache):
    out_dir = tmp_path / "sft"
    common = ["--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out_dir),
              "--precision", "fp32", "--batch-size", "2", "--max-length", "256"]
    assert main(["sft", *common, "--max-steps", "2", "--save-every", "2"]) == 0
    assert "loss: sft" in (out_dir / "config.yaml").read_text()
    assert "dpop: done: 2 steps" in capsys.readouterr().out

    assert main(["sft", "--output-dir", str(out_dir), "--resume", "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "dpop: done: 3 steps" in out
    rows = [json.loads(line) for line in read_lines(out_dir / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(row["loss"] > 0 for row in rows)
