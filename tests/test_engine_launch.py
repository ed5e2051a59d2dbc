"""The srun path: two processes that only have SLURM_* variables (as `srun -n 2` gives them) form a gloo group."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import forkserver
from conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


def free_job_port() -> int:
    import random
    for port in random.Random(os.getpid()).sample(range(20000, 40000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 20000-39999")


def test_slurm_environment_only(tmp_path):
    (tmp_path / "tiny.yaml").write_text(tiny_recipe(batch={"micro_batch": 4}, checkpoint={"export": False}))
    job = free_job_port() - 20000  # the job id decides the port: 20000 + id % 20000
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    procs = []
    for rank in range(2):
        env = dict(base, OMP_NUM_THREADS="1", SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_ID=str(job), SLURM_JOB_NODELIST="127.0.0.1")
        procs.append(forkserver.popen([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config",
                                       str(tmp_path / "tiny.yaml"), "--output-dir", str(tmp_path / "out")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-2000:] + e[-2000:]
    ds = json.loads((tmp_path / "out" / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2  # 16 / (4 x world size 2)
    meta = json.loads((tmp_path / "out" / "checkpoints" / "global_step4" / "mff_complete.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 4


def test_rerun_of_a_finished_run_says_there_is_nothing_to_do(tmp_path):
    (tmp_path / "tiny.yaml").write_text(tiny_recipe(checkpoint={"export": False}))
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(tmp_path / "tiny.yaml"),
           "--output-dir", str(tmp_path / "out"), "--max-steps", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    first, again = (forkserver.run(cmd, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                                   timeout=120) for _ in range(2))
    assert first.returncode == again.returncode == 0, again.stderr[-2000:]
    assert "done: step 2/" in first.stdout and "None" not in first.stdout
    assert f"nothing to do: the run in {tmp_path / 'out'} is already at step 2/" in again.stdout


# ------------------------------------------------------------------ the SLURM script's arguments
def _sbatch_with_fake_srun(tmp_path, *args, **env_over):
    """Run launch/slurm/pretrain.sbatch outside SLURM with an `srun` that records its arguments."""
    import stat
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "srun"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_SRUN_ARGS"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "srun_args.txt"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_SRUN_ARGS=str(record), MFF_REPO=str(REPO),
               SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", MASTER_ADDR="127.0.0.1", MFF_PYTHON=sys.executable,
               **env_over)
    if "MFF_OUTPUT_DIR" not in env_over:
        env.pop("MFF_OUTPUT_DIR", None)
    p = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "pretrain.sbatch"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    return p, record.read_text().splitlines() if record.exists() else []


def test_sbatch_keeps_the_users_output_dir(tmp_path):
    mine = str(tmp_path / "mine")
    p, args = _sbatch_with_fake_srun(tmp_path, "--config", "demo", "--output-dir", mine, "--set", "a=b")
    assert p.returncode == 0, p.stderr
    assert f"output {mine}" in p.stdout and args.count("--output-dir") == 1
    assert args[args.index("--output-dir") + 1] == mine
    assert args[args.index("--config") + 1] == "demo" and "a=b" in args
    p, args = _sbatch_with_fake_srun(tmp_path, f"--output-dir={mine}2")
    assert args[args.index("--output-dir") + 1] == f"{mine}2"
    job = f"test-sbatch-{os.getpid()}"  # the documented default, runs/<job name> (from the checkout)
    try:
        p, args = _sbatch_with_fake_srun(tmp_path, "--config", "demo", SLURM_JOB_NAME=job)
        assert args[args.index("--output-dir") + 1] == f"runs/{job}"
    finally:
        import shutil
        shutil.rmtree(REPO / "runs" / job, ignore_errors=True)


def test_an_abbreviated_output_dir_is_refused_not_trained_elsewhere(tmp_path):
    """`--output mine` is no `--output-dir mine`: argparse's abbreviations are off, so launch/pretrain.py refuses it
    in one line (exit 2) instead of training into the default directory; under the sbatch script (which knows only
    the full name) the job fails the same way at once."""
    mine = tmp_path / "mine"
    p = forkserver.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--output", str(mine), "--max-steps",
                        "1"], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and f"error: unrecognized arguments: --output {mine}" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not mine.exists() and not (tmp_path / "runs").exists()
    default = tmp_path / "job-output"
    p, args = _sbatch_with_fake_srun(tmp_path, "--config", "demo", "--output", str(mine), "--max-steps", "1",
                                     MFF_OUTPUT_DIR=str(default))
    assert p.returncode == 0, p.stderr
    assert args[args.index("--output-dir") + 1] == str(default) and args[args.index("--output") + 1] == str(mine)
    r = forkserver.run([sys.executable, *args[args.index("launch/pretrain.py"):]], cwd=REPO,  # what srun runs
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"error: unrecognized arguments: --output {mine}" in r.stderr, r.stderr[-2000:]
    assert not mine.exists() and not any(default.iterdir())
