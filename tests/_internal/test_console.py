"""The quiet console: stage lines on the terminal, everything else (fd 1 and 2, child processes included) in the
log; progress parsing for the live line."""

import subprocess
import sys
import textwrap

from raydebias._internal.console import Console, latest_progress


def test_latest_progress_takes_the_last_a_of_b():
    text = "clip step 20/200 loss 3.4\n[data] 256/10500 rows 42 rows/s\ndiffusion step 300/1000 loss 0.35 (4.2 it/s)\n"
    assert latest_progress(text) == ("diffusion step", 300, 1000)
    assert latest_progress("epoch 0/8 starting") is None  # 0 done: no rate to extrapolate
    assert latest_progress("no progress here") is None
    assert latest_progress("step 12/10") is None


def test_quiet_console_sends_everything_but_stage_lines_to_the_log(tmp_path):
    log = tmp_path / "logs" / "run.log"
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from raydebias._internal.console import Console
        with Console({str(log)!r}, live=False) as c:
            print("python stdout noise")
            print("python stderr noise", file=sys.stderr)
            os.write(1, b"fd noise\\n")
            subprocess.run([sys.executable, "-c", "print('child noise')"], check=True)
            c.progress({{"event": "start", "i": 1, "n": 2, "stage": "data"}})
            c.progress({{"event": "done", "i": 1, "n": 2, "stage": "data", "seconds": 3.2}})
            c.progress({{"event": "skip", "i": 2, "n": 2, "stage": "clip"}})
        print("after")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["[1/2] data                         done in 3 s",
                                     "[2/2] clip                         skipped (completed, inputs unchanged)",
                                     "after"]
    assert p.stderr == ""
    text = log.read_text()
    for noise in ("python stdout noise", "python stderr noise", "fd noise", "child noise", "[1/2] data"):
        assert noise in text


def test_verbose_console_leaves_the_streams_alone(tmp_path, capsys):
    with Console(tmp_path / "run.log", verbose=True) as c:
        print("noise")
        c.print("[1/1] data done")
    assert capsys.readouterr().out == "noise\n[1/1] data done\n"
    assert not (tmp_path / "run.log").exists()


def test_a_failed_stage_is_one_line_with_the_log_path(tmp_path):
    """`raydebias run` on a dataset missing its label column: the data stage fails; the console gets the stage,
    the cause and the log path, no traceback; the traceback is in the log; exit status 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"x"], "split": ["train"]}), tmp_path / "bad.parquet")
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "raydebias.cli", "run", "raydebias/configs/parquet_dataset.yaml",
                        "--run-dir", str(run_dir), "--set", f"data.uri={tmp_path / 'bad.parquet'}",
                        "--set", "stages=[data]", "--set", "ray.num_cpus=1", "--set", "ray.include_dashboard=false"],
                       capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"})
    assert p.returncode == 1, p.stdout + p.stderr
    assert "[1/1] data" in p.stdout and "FAILED" in p.stdout and "label" in p.stdout, p.stdout
    assert str(run_dir / "logs" / "run.log") in p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    assert "Traceback" in (run_dir / "logs" / "run.log").read_text()
