"""System tests, for real on this machine (CPU, gloo): deepspeed --hostfile over ssh/pdsh on two loopback
"hosts", a single-machine SLURM cluster running launch/slurm/pretrain.sbatch (both styles, signal, requeue),
a rank killed under torchrun, and a hung rank caught by the collective timeout.

They need root and the Debian packages that launch/system_deps.sh installs; otherwise they skip and say why.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forkserver

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PRETRAIN = str(REPO / "launch" / "pretrain.py")
CONFIG = str(REPO / "configs" / "demo.yaml")
# a tiny model on 8-image steps: each launch is dominated by start-up, not training
TINY = [f"--set={kv}" for kv in (
    "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.out_indices=[0,1]",
    "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "batch.global_batch=8", "batch.micro_batch=4", "data.num_workers=0", "logging.image_every_steps=0",
    "logging.tensorboard=false", "logging.progress_bar=false", "logging.every_steps=1", "checkpoint.export=false",
    "checkpoint.every_steps=0")]


def need(*binaries):
    if os.geteuid() != 0:
        pytest.skip("system test: needs root (starts sshd / munged / slurmd); run it through .ci/run")
    missing = [b for b in binaries if not shutil.which(b) and not os.path.exists(b)]
    if missing:
        pytest.skip(f"system test: missing {', '.join(missing)}; install with `sudo launch/system_deps.sh`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PATH"] = f"{Path(PY).parent}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def steps_logged(out: Path) -> list:
    f = out / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip()]


def complete_steps(out: Path) -> list:
    root = out / "checkpoints"
    return sorted(int(p.parent.name[len("global_step"):]) for p in root.glob("global_step*/mff_complete.json"))


def wait_for(cond, timeout, what, proc=None, log=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = Path(log).read_text()[-4000:] if log and Path(log).exists() else ""
    why = f"the process exited ({proc.returncode})" if proc is not None and proc.poll() is not None else \
        f"timed out after {timeout}s"
    raise AssertionError(f"{why} waiting for {what}\n{tail}")


# ------------------------------------------------------------------ SSH: deepspeed --hostfile over pdsh
@pytest.fixture
def sshd(tmp_path):
    """An sshd on 127.0.0.1 and 127.0.0.2 with throwaway keys; `bin/ssh` wraps ssh with our config."""
    need("/usr/sbin/sshd", "ssh", "ssh-keygen", "pdsh")
    d = tmp_path / "ssh"
    (d / "bin").mkdir(parents=True)
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\nListenAddress 127.0.0.2:{port}\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\n")
    (d / "ssh_config").write_text(
        f"Host 127.0.0.1 127.0.0.2\n  Port {port}\n  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
    wrapper = d / "bin" / "ssh"  # deepspeed's ssh check and pdsh's ssh module both run `ssh` from PATH
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {d}/ssh_config \"$@\"\n")
    wrapper.chmod(0o755)
    os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation directory
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    env = base_env(PATH=f"{d}/bin:{Path(PY).parent}:{os.environ.get('PATH', '')}")
    try:
        wait_for(lambda: subprocess.run(["ssh", "127.0.0.2", "true"], env=env, capture_output=True).returncode == 0,
                 20, "sshd to accept the throwaway key", proc, d / "sshd.log")
        yield env
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_deepspeed_hostfile_over_ssh_trains_and_resumes(sshd, tmp_path):
    env = sshd
    work = tmp_path / "work"
    work.mkdir()
    (work / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    # .deepspeed_env in the launch directory carries PATH, DS_ACCELERATOR, OMP_NUM_THREADS to every node
    subprocess.run([str(REPO / "launch" / "slurm" / "deepspeed_env.sh"), ".deepspeed_env"], cwd=work, env=env,
                   check=True)
    assert "DS_ACCELERATOR=cpu" in (work / ".deepspeed_env").read_text().splitlines()
    out = tmp_path / "out"

    def launch(max_steps):
        cmd = [PY, "-m", "deepspeed.launcher.runner", "--hostfile", "hostfile", "--launcher", "pdsh",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), PRETRAIN, "--config", CONFIG,
               "--output-dir", str(out), "--max-steps", str(max_steps), "--resume", "auto", *TINY]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=180)
        print(f"deepspeed --launcher pdsh, 2 hosts x 1 slot, {max_steps} steps: {time.time() - t0:.1f}s")
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        return r.stdout + r.stderr

    log = launch(3)
    # the launcher reached both "hosts" over pdsh and each ran one rank of a world of 2
    assert "deepspeed_env file = ./.deepspeed_env" in log
    assert re.search(r"^127\.0\.0\.1: .*node_rank=0", log, re.M) and re.search(r"^127\.0\.0\.2: .*node_rank=1", log, re.M)
    assert "done: step 3/" in log
    assert complete_steps(out) == [3]
    assert (out / "checkpoints" / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()

    log = launch(5)
    assert "resumed from" in log and "at step 3" in log, log[-3000:]
    assert steps_logged(out) == [1, 2, 3, 4, 5]  # continued at 4, nothing retrained
    assert complete_steps(out)[-1] == 5


# ------------------------------------------------------------------ SLURM: sbatch launch/slurm/pretrain.sbatch
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd for this machine (2 CPUs), config in a temp dir; yields the client env."""
    need("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch", "scontrol", "scancel", "sinfo")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=mfftest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
JobRequeue=1
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = base_env(SLURM_CONF=str(conf))
    procs = []
    try:
        for cmd in (["/usr/sbin/munged", "--foreground", "--force", f"--key-file={key}", f"--socket={d}/munge.sock",
                     f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed"],
                    ["/usr/sbin/slurmctld", "-D", "-i"], ["/usr/sbin/slurmd", "-D"]):
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                                  text=True).stdout, 30, "the slurm node to be idle", None,
                 d / "slurmctld.log")
        yield env
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def job_state(env, job) -> dict:
    r = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def sbatch(env, out: Path, args, ntasks=2, **extra) -> str:
    env = dict(env, MFF_OUTPUT_DIR=str(out), MFF_PYTHON=PY, **extra)
    out.mkdir(exist_ok=True)
    cmd = ["sbatch", "--parsable", "--nodes=1", f"--ntasks={ntasks}", f"--ntasks-per-node={ntasks}",
           f"--cpus-per-task={2 // ntasks}",
           "--time=10", f"--output={out}/slurm-%j.out", f"--chdir={REPO}",
           str(REPO / "launch" / "slurm" / "pretrain.sbatch"), "--config", CONFIG, *TINY, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip().split(";")[0]


def wait_job(env, job, out, timeout=180) -> dict:
    log = out / f"slurm-{job}.out"
    wait_for(lambda: job_state(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                            "NODE_FAIL", "OUT_OF_MEMORY"), timeout,
             f"slurm job {job}", None, log)
    return job_state(env, job)


def test_slurm_sbatch_trains_resumes_and_saves_on_signal(slurm, tmp_path):
    env = slurm
    out = tmp_path / "run"
    # job 1, "deepspeed" style: one task running the deepspeed launcher (--no_ssh, 2 ranks) on a hostfile from
    # scontrol; SIGUSR1 to the batch script mid-run reaches the ranks: checkpoint, exit 75 (requeue off here)
    t0 = time.time()
    job = sbatch(env, out, ["--max-steps", "200"], ntasks=1, MFF_LAUNCH="deepspeed", MFF_SLOTS="2",
                 MFF_DS_STOP_CHECK_EVERY="2", MFF_NO_REQUEUE="1")
    wait_for(lambda: len(steps_logged(out)) >= 2, 120, "job 1 to train 2 steps", None, out / f"slurm-{job}.out")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    st = wait_job(env, job, out)
    log = (out / f"slurm-{job}.out").read_text()
    print(f"sbatch 1 task (deepspeed launcher, 2 slots), USR1 mid-run: {time.time() - t0:.1f}s")
    assert (out / f"hostfile.{job}").read_text() == f"{socket.gethostname().split('.')[0]} slots=2\n"
    assert "stopped by SIGUSR1 at step" in log, log[-4000:]
    first = int(re.search(r"stopped by SIGUSR1 at step (\d+)", log).group(1))
    assert 2 <= first < 200 and first % 2 == 0 and complete_steps(out) == [first]
    assert st["JobState"] == "FAILED" and st["ExitCode"] == "75:0" and "not requeueing" in log, log[-4000:]
    assert (out / "checkpoints" / f"global_step{first}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()

    # job 2, "srun" style (2 tasks = 2 ranks): resumes from job 1's checkpoint; SIGUSR1 to the batch script
    # mid-run (what --signal=B:USR1@180 does before the time limit) -> checkpoint, exit 75, requeue, resume
    t0 = time.time()
    last = first + 60
    job = sbatch(env, out, ["--max-steps", str(last)], MFF_DS_STOP_CHECK_EVERY="2")
    wait_for(lambda: len(steps_logged(out)) >= first + 2, 120, "job 2 to train 2 steps", None, out / f"slurm-{job}.out")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    # Slurm holds a requeued job for ~2 minutes; start it as soon as the first run has left the node (a start
    # in the same second as the requeue is refused: "Job credential revoked")
    wait_for(lambda: (lambda s: s.get("JobState") == "PENDING" and int(s.get("Restarts", 0)) >= 1)(
        job_state(env, job)), 60, "the requeue", None, out / f"slurm-{job}.out")
    wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                              text=True).stdout, 60, "the node to be idle again")
    idle_at = int(time.time())
    wait_for(lambda: int(time.time()) > idle_at, 5, "the next second (Slurm's credentials have 1 s resolution)")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    st = wait_job(env, job, out)
    log = (out / f"slurm-{job}.out").read_text()
    print(f"sbatch 2 tasks (srun): resume, USR1, requeue, resume, {last - first} steps: {time.time() - t0:.1f}s")
    assert f"at step {first} " in log and "resumed from" in log, log[-4000:]
    assert "SIGUSR1: asking the ranks to save" in log and "stopped by SIGUSR1 at step" in log, log[-4000:]
    stopped = int(re.search(r"stopped by SIGUSR1 at step (\d+)", log).group(1))
    assert first + 2 <= stopped < last and stopped % 2 == 0
    assert "requeueing job" in log and int(st["Restarts"]) == 1
    assert f"resumed from {out}/checkpoints/global_step{stopped} at step {stopped}" in log
    assert st["JobState"] == "COMPLETED" and f"done: step {last}/" in log, log[-4000:]
    assert steps_logged(out) == list(range(1, last + 1))  # nothing lost, nothing repeated across jobs and the requeue
    assert complete_steps(out)[-1] == last


# ------------------------------------------------------------------ failure: a rank dies
def test_killed_rank_ends_the_run_and_is_named(tmp_path):
    need()  # root only, for uniformity with the other system tests; torchrun comes with torch
    out = tmp_path / "out"
    log = tmp_path / "torchrun.log"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}", PRETRAIN,
           "--config", CONFIG, "--output-dir", str(out), "--max-steps", "100000", *TINY]
    with open(log, "w") as f:
        proc = forkserver.popen(cmd, env=base_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(steps_logged(out)) >= 2, 120, "training to start", proc, log)
        ranks = {}
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks[int(next(e for e in environ if e.startswith(b"RANK=")).split(b"=")[1])] = int(pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        rc = proc.wait(60)  # a run that outlives a dead rank by a minute hangs: TimeoutExpired fails the test
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc != 0
    # the elastic agent's report names the rank that died first, and how
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", text, re.S), text[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(ranks[0], 0)  # the surviving rank is gone too


def test_hung_rank_times_out_instead_of_hanging(tmp_path):
    """No launcher to watch the ranks (two bare processes, as srun starts them): rank 1 stops answering
    (SIGSTOP); rank 0 must fail its next collective after MFF_DS_COLLECTIVE_TIMEOUT_S, not hang for 30 min."""
    need()
    out = tmp_path / "out"
    port = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"rank{rank}.log")
        env = base_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), MFF_DS_COLLECTIVE_TIMEOUT_S="10")
        with open(logs[-1], "w") as f:
            procs.append(forkserver.popen([PY, PRETRAIN, "--config", CONFIG, "--output-dir", str(out),
                                           "--max-steps", "100000", *TINY], env=env, stdout=f,
                                          stderr=subprocess.STDOUT))
    try:
        wait_for(lambda: len(steps_logged(out)) >= 2, 120, "training to start", procs[0], logs[0])
        os.kill(procs[1].pid, signal.SIGSTOP)
        try:
            rc = procs[0].wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("rank 0 still blocked 60 s after rank 1 hung: the collective timeout "
                                 "(MFF_DS_COLLECTIVE_TIMEOUT_S) does not reach DeepSpeed's process groups")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = logs[0].read_text()
    # the configured timeout (not an earlier failure of another kind) ended the run: rank 0 names it
    assert rc != 0
    assert "[rank0]" in text and "Timed out waiting 10000ms" in text, text[-3000:]
