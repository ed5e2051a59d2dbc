"""System tests, for real on this machine (CPU, gloo), on two hosts made here (tests/rigs/cluster.py: network, UTS
and mount namespaces, an sshd each): the rig itself; deepspeed --hostfile over ssh/pdsh and torchrun's c10d
rendezvous, each training, checkpointing and resuming across the hosts to the weights of the same run on one host; a
two-node SLURM cluster running launch/slurm/pretrain.sbatch (both styles, signal, requeue); then, on this machine, a
rank killed under torchrun and a hung rank caught by the collective timeout.

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
import tempfile
import time
from pathlib import Path

import pytest
import torch

import forkserver
from rigs import cluster as rig

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
        pytest.skip("system test: needs root (makes network namespaces, starts sshd / munged / slurmd); run it through "
                    ".ci/run")
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
    """The steps of metrics.jsonl's training lines (a record written alone at the end, with its step, has no loss)."""
    f = out / "metrics.jsonl"
    if not f.exists():
        return []
    return [r["step"] for r in map(json.loads, filter(str.strip, f.read_text().splitlines())) if "loss" in r]


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


# ------------------------------------------------------------------ the rig: two hosts on this machine
@pytest.fixture(scope="module")
def cluster():
    """node1, node2 and node3 (tests/rigs/cluster.py): own hostname, /tmp, /dev/shm, address, sshd; shared by the
    module. The runs use node1 and node2; node3 is SLURM's spare, for a job that leaves a lost host out."""
    need(*rig.BINARIES, "pdsh")
    with rig.Cluster(3) as c:
        yield c


def shared_dir(c, name) -> Path:
    """A fresh folder on the filesystem every host sees (pytest's tmp_path is in this machine's own /tmp)."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=c.dir))


# run in a host: `connect HOST PORT` prints how a connect ends ("connected" or the exception's name); `recv PORT`
# prints the bytes that arrive in the second after the first one; `send HOST PORT` sends until the receiver hangs up
PROBE = r"""
import socket, sys, time
what, *args = sys.argv[1:]
if what == "connect":
    try:
        socket.create_connection((args[0], int(args[1])), timeout=1).close()
        print("connected")
    except OSError as e:
        print(type(e).__name__)
elif what == "recv":
    conn, _ = socket.create_server(("0.0.0.0", int(args[0]))).accept()
    n, end = len(conn.recv(1 << 16)), time.monotonic() + 1.0
    while time.monotonic() < end:
        conn.settimeout(end - time.monotonic())
        try:
            got = conn.recv(1 << 20)
        except (TimeoutError, ValueError):  # the second is over (ValueError: it ended just before settimeout)
            break
        if not got:
            break
        n += len(got)
    print(n)
else:
    for _ in range(100):  # the receiver may not listen yet
        try:
            s = socket.create_connection((args[0], int(args[1])), timeout=30)
            break
        except ConnectionRefusedError:
            time.sleep(0.1)
    else:
        sys.exit(f"send: nothing listens on {args[0]}:{args[1]} after 10 s")
    try:
        while True:
            s.sendall(b"x" * (1 << 16))
    except OSError:  # reset when the receiver closes (or 30 s without progress)
        pass
"""


def probe(c, host, *args) -> str:
    r = c.run(host, [PY, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def proc_state(pid) -> str:
    """R, S, T (stopped), Z (zombie), ...: the field after the command name in /proc/PID/stat ("" once gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def transfer(c, src, dst) -> int:
    """Bytes that `src` moves to `dst` in one second."""
    recv = c.spawn(dst, [PY, "-c", PROBE, "recv", "5001"], stdout=subprocess.PIPE, text=True)
    probe(c, src, "send", dst, "5001")
    return int(recv.communicate(timeout=60)[0])


def test_rig_hosts_are_separate_and_its_faults_work(cluster):
    """The rig itself: what makes node1 and node2 two hosts, and each fault the fault tests use. (It reboots node2:
    it runs before the tests that start daemons on the rig.)"""
    c = cluster

    def on(host, *cmd):
        r = c.run(host, cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (cmd, r.stderr)
        return r.stdout

    mark = f"mffrig-mark-{os.getpid()}"
    for h in c.hosts:
        on(h, "sh", "-c", f"hostname | tee /tmp/{mark} > /dev/shm/{mark}")
    for h in c.hosts:
        assert on(h, "hostname").strip() == h
        assert on(h, "cat", f"/tmp/{mark}", f"/dev/shm/{mark}").split() == [h, h]  # its own /tmp, /dev/shm
    assert not os.path.exists(f"/tmp/{mark}") and not os.path.exists(f"/dev/shm/{mark}")  # not this machine's
    (c.dir / mark).write_text("shared")
    assert on("node2", "cat", str(c.dir / mark)) == "shared"  # the rest of the filesystem: shared
    # each host reaches the others by name: /etc/hosts, ssh, pdsh
    assert on("node1", "getent", "hosts", "node2").split() == ["198.18.0.2", "node2"]
    assert on("node1", "ssh", "node2", "hostname").strip() == "node2"
    assert sorted(on("node1", "pdsh", "-R", "ssh", "-w", "node1,node2", "hostname").splitlines()) == [
        "node1: node1", "node2: node2"]

    # a cut link drops packets both ways: a connect times out as to a lost node (an open port would accept, a
    # closed one refuse); restored, it connects again
    assert probe(c, "node1", "connect", "node2", "22") == "connected"
    c.cut("node2")
    try:
        assert probe(c, "node1", "connect", "node2", "22") == "TimeoutError"
        assert probe(c, "node2", "connect", "node1", "22") == "TimeoutError"
    finally:
        c.restore("node2")
    assert probe(c, "node1", "connect", "node2", "22") == "connected"

    # tbf at 1 Mbit/s: one second moves about 125 kB (+ the 16 kB burst), unshaped many MB
    fast = transfer(c, "node1", "node2")
    c.slow("node1", "1mbit")
    try:
        slow = transfer(c, "node1", "node2")
    finally:
        c.restore("node1")
    print(f"rig: bytes in one second node1 -> node2: {fast:,} unshaped, {slow:,} at 1 Mbit/s")
    assert 30_000 < slow < 2 * (125_000 + 16_384) and fast > 20 * slow, (fast, slow)
    if c.netem_missing:  # delay and loss need netem: refused in one line where the kernel lacks it
        print(f"rig: {c.netem_missing}")
        with pytest.raises(rig.RigError, match="netem"):
            c.slow("node1", delay="100ms")

    # freeze: every process of node2 stopped (T), thaw: none
    c.freeze("node2")
    try:
        frozen = {p: proc_state(p) for p in c.pids("node2")}
    finally:
        c.thaw("node2")
    assert len(frozen) >= 2 and set(frozen.values()) == {"T"}, frozen  # the anchor and sshd at least
    assert "T" not in {proc_state(p) for p in c.pids("node2")}

    # kill: nothing of node2 runs, its address answers (refused: a rebooting node); boot: up again, /tmp empty
    c.kill("node2")
    try:
        assert c.pids("node2") == []
        assert probe(c, "node1", "connect", "node2", "22") == "ConnectionRefusedError"
    finally:
        c.boot("node2")
    assert on("node1", "ssh", "node2", f"test ! -e /tmp/{mark} && hostname").strip() == "node2"


def test_the_rig_keeps_the_folder_of_tmp_it_runs_from_visible_in_its_hosts(monkeypatch):
    """Each host gets a fresh /tmp; a checkout (and its venv) in this machine's /tmp, as a fresh clone may be, is bound
    back into every host at its own path, or no host could start a command from it (Cluster.boot)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        os.makedirs(os.path.join(d, "repo", "sub"))
        monkeypatch.chdir(os.path.join(d, "repo", "sub"))
        assert os.path.realpath(d) in rig.Cluster.kept()  # the folder directly in /tmp: the bind covers the tree
        monkeypatch.chdir("/")


def test_rig_left_by_a_killed_run_is_removed(cluster):
    """A rig whose process was SIGKILLed keeps its hosts (processes, namespaces, links, files); the next rig's sweep
    removes them, and only them (this module's rig lives on)."""
    p = subprocess.Popen([PY, str(REPO / "tests" / "rigs" / "cluster.py"), "1"], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # once the rig is up (an empty line: it failed, and said why on stderr)
    finally:
        p.kill()
        p.wait()
    name = f"{rig.PREFIX}{p.pid}"
    assert line.startswith(f"rig {name}:"), line

    def left():  # its namespaces (NAME-host), bridge (NAME) and veths (NAMEv0, ...), folder
        return ([n for n in rig.sh("ip", "netns", "list").split() if n.startswith(name + "-")],
                [n for n in re.findall(r"^\d+: ([^:@\s]+)", rig.sh("ip", "-o", "link"), re.M)
                 if re.fullmatch(rf"{name}(v\d)?", n)],
                list(rig.STATE.glob(name)))
    netns, links, dirs = left()
    pids = rig.ns_pids(netns[0]) if netns else []
    assert netns and links and dirs and pids, (netns, links, dirs, pids)  # the anchor and sshd outlived it
    rig.sweep()
    assert left() == ([], [], [])
    assert not [q for q in pids if proc_state(q) not in ("", "Z")]  # gone (a zombie until init reaps it)
    assert cluster.run("node1", ["ssh", "node2", "true"]).returncode == 0


# ------------------------------------------------------------------ launchers across the two hosts
STEPS = 24  # each launcher trains 3 steps, then resumes to STEPS; the weights must equal ONE_HOST's


def checkpoint_tensors(out: Path, step: int) -> dict:
    """Every tensor of checkpoint global_step<step> by file and key: the model's weights, each rank's fp32 partition
    and Adam moments."""
    found = {}

    def walk(obj, where):
        if isinstance(obj, torch.Tensor):
            found[where] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}/{i}")
    for f in sorted((out / "checkpoints" / f"global_step{step}").glob("*.pt")):
        walk(torch.load(f, map_location="cpu", weights_only=False), f.name)
    return found


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    """The same recipe on one host, 2 ranks (torchrun --standalone), STEPS steps straight: its checkpoint."""
    need()
    out = tmp_path_factory.mktemp("one_host")
    t0 = time.time()
    r = forkserver.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", PRETRAIN,
                        "--config", CONFIG, "--output-dir", str(out), "--max-steps", str(STEPS), *TINY],
                       env=base_env(), capture_output=True, text=True, timeout=300)
    print(f"one host, 2 ranks, {STEPS} steps: {time.time() - t0:.1f}s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return checkpoint_tensors(out, STEPS)


def assert_same_as_one_host(out: Path, one_host: dict):
    """Bit for bit: the model's weights, each rank's fp32 partition and Adam moments at step STEPS."""
    two = checkpoint_tensors(out, STEPS)
    assert two.keys() == one_host.keys()
    differ = [k for k in two if not torch.equal(two[k], one_host[k])]
    assert not differ, f"{len(differ)} of {len(two)} tensors differ from the 1-host run's, e.g. {differ[:5]}"


def test_deepspeed_hostfile_over_pdsh_two_hosts(cluster, one_host):
    """`deepspeed --hostfile` on node1 reaches node1 and node2 over pdsh/ssh, one rank each: trains, checkpoints,
    resumes, and ends with the weights of the same run on one host."""
    c = cluster
    work = shared_dir(c, "deepspeed")
    (work / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    env = base_env()
    # .deepspeed_env in the launch directory carries PATH, DS_ACCELERATOR, OMP_NUM_THREADS to every node
    c.run("node1", [str(REPO / "launch" / "slurm" / "deepspeed_env.sh"), ".deepspeed_env"], cwd=work, env=env,
          check=True)
    assert "DS_ACCELERATOR=cpu" in (work / ".deepspeed_env").read_text().splitlines()
    out = work / "out"

    def launch(max_steps):
        cmd = [PY, "-m", "deepspeed.launcher.runner", "--hostfile", "hostfile", "--launcher", "pdsh",
               "--master_addr", "node1", "--master_port", str(29500 + max_steps), PRETRAIN, "--config", CONFIG,
               "--output-dir", str(out), "--max-steps", str(max_steps), "--resume", "auto", *TINY]
        t0 = time.time()
        r = c.run("node1", cmd, cwd=work, env=env, capture_output=True, text=True, timeout=240)
        print(f"deepspeed --launcher pdsh, node1 + node2 x 1 slot, to step {max_steps}: {time.time() - t0:.1f}s")
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        return r.stdout + r.stderr

    log = launch(3)
    # the launcher reached both hosts by name over pdsh, and each ran one rank of a world of 2
    assert "deepspeed_env file = ./.deepspeed_env" in log
    assert re.search(r"^node1: .*node_rank=0", log, re.M) and re.search(r"^node2: .*node_rank=1", log, re.M), log
    assert "done: step 3/" in log
    assert complete_steps(out) == [3]
    assert (out / "checkpoints" / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()

    log = launch(STEPS)
    assert "resumed from" in log and "at step 3" in log, log[-3000:]
    assert steps_logged(out) == list(range(1, STEPS + 1))  # continued at 4, nothing retrained
    assert_same_as_one_host(out, one_host)


def rank_pid(c, rank):
    """The PID of global rank `rank`'s process, and its host."""
    for h in c.hosts:
        for pid in c.pids(h):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"pretrain.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid, h
    return None, None


def test_torchrun_c10d_rendezvous_two_hosts(cluster, one_host):
    """One torchrun agent per host meeting at node1's c10d rendezvous (--max-restarts 2), a checkpoint every 4 steps.
    Once step FREEZE is logged, rank 1 stops answering (SIGSTOP): rank 0 names it, the agents restart the workers,
    which resume from the newest checkpoint, and the run completes unattended with every step logged once and the
    weights of the same run on one host."""
    c = cluster
    work = shared_dir(c, "torchrun")
    out = work / "out"
    cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "node1:29400", "--rdzv-id", "mff", "--max-restarts", "2", PRETRAIN, "--config", CONFIG,
           "--output-dir", str(out), "--max-steps", str(STEPS), *TINY, "--set=checkpoint.every_steps=4"]
    t0 = time.time()
    # the agents say what the rendezvous gave them (LOGLEVEL); each host keeps its own copy of the data, in its own
    # /tmp (MFF_DS_CACHE: the demo photographs are built there); restarts across hosts need a store per rendezvous
    # round (distributed.restart_store)
    env = base_env(LOGLEVEL="INFO", MFF_DS_CACHE="/tmp/mff_ds", MFF_DS_COLLECTIVE_TIMEOUT_S="60",
                   MFF_DS_PEER_TIMEOUT_S="6", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    hosts = ("node1", "node2")
    agents = {h: c.spawn(h, cmd, cwd=work, env=env, log=work / f"{h}.log") for h in hosts}
    freeze = 10
    try:
        wait_for(lambda: steps_logged(out)[-1:] >= [freeze], 180, f"step {freeze}", agents["node1"],
                 work / "node1.log")
        pid, _ = rank_pid(c, 1)
        os.kill(pid, signal.SIGSTOP)
        rcs = {h: p.wait(240) for h, p in agents.items()}
    finally:
        for p in agents.values():
            if p.poll() is None:
                p.kill()
    print(f"torchrun c10d, node1 + node2 x 1 rank, {STEPS} steps, rank 1 frozen at step {freeze} or so: "
          f"{time.time() - t0:.1f}s")
    logs = {h: (work / f"{h}.log").read_text() for h in hosts}
    assert rcs == {h: 0 for h in hosts}, "\n".join(f"{h}: {log[-3000:]}" for h, log in logs.items())
    # both agents joined one rendezvous of 2 nodes, each with its own group rank; the ranks trained together
    ranks = {h: re.findall(r"group_rank=(\d)\n.*group_world_size=2\n", log) for h, log in logs.items()}
    assert sorted(r[0] for r in ranks.values()) == ["0", "1"], logs
    text = "".join(logs.values())
    lost = re.search(r"lost peer: rank 1 on node[12] \(no heartbeat for 6 s\) at step (\d+); newest complete "
                     r"checkpoint \S+/global_step(\d+);", text)
    assert lost, text[-4000:]
    saved = int(lost.group(2))
    assert saved % 4 == 0 and freeze - 4 <= saved <= int(lost.group(1)) and f"at step {saved} " in text
    assert f"done: step {STEPS}/" in text
    assert steps_logged(out) == list(range(1, STEPS + 1))  # the redone steps are logged once
    assert_same_as_one_host(out, one_host)


# ------------------------------------------------------------------ SLURM across the two hosts
@pytest.fixture(scope="module")
def slurm(cluster):
    """munged on both hosts, slurmctld on node1, a slurmd on each (1 CPU each): yields the client environment."""
    need(*rig.SLURM_BINARIES)
    with rig.slurm(cluster) as env:
        yield base_env(SLURM_CONF=env["SLURM_CONF"])


def slurm_cmd(c, env, *cmd) -> str:
    """A SLURM command on node1 (the login node), its stdout."""
    return c.run("node1", cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout


def job_state(c, env, job) -> dict:
    return dict(re.findall(r"(\w+)=(\S*)", slurm_cmd(c, env, "scontrol", "-o", "show", "job", job)))


def all_idle(c, env) -> bool:
    return slurm_cmd(c, env, "sinfo", "-h", "-N", "-o", "%T").split() == ["idle"] * len(c.hosts)


def sbatch(c, env, out: Path, args, **extra) -> str:
    """launch/slurm/pretrain.sbatch on both nodes, one task each."""
    env = dict(env, MFF_OUTPUT_DIR=str(out), MFF_PYTHON=PY, **extra)
    out.mkdir(exist_ok=True)
    return slurm_cmd(c, env, "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                     "--time=10", f"--output={out}/slurm-%j.out", f"--chdir={REPO}",
                     str(REPO / "launch" / "slurm" / "pretrain.sbatch"), "--config", CONFIG, *TINY,
                     *args).strip().split(";")[0]


def wait_job(c, env, job, out, timeout=240) -> dict:
    log = out / f"slurm-{job}.out"
    wait_for(lambda: job_state(c, env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                "NODE_FAIL", "OUT_OF_MEMORY"), timeout,
             f"slurm job {job}", None, log)
    return job_state(c, env, job)


def test_slurm_sbatch_two_nodes_trains_resumes_and_saves_on_signal(cluster, slurm):
    c, env = cluster, slurm
    out = shared_dir(c, "slurm")
    # job 1, "deepspeed" style: one task per node running the deepspeed launcher (--no_ssh, 1 rank each) on a
    # hostfile from scontrol; SIGUSR1 to the batch script mid-run reaches both ranks: checkpoint, exit 75 (requeue
    # off here)
    t0 = time.time()
    job = sbatch(c, env, out, ["--max-steps", "200"], MFF_LAUNCH="deepspeed", MFF_SLOTS="1",
                 MFF_DS_STOP_CHECK_EVERY="2", MFF_NO_REQUEUE="1")
    wait_for(lambda: len(steps_logged(out)) >= 2, 120, "job 1 to train 2 steps", None, out / f"slurm-{job}.out")
    slurm_cmd(c, env, "scancel", "--batch", "--signal=USR1", job)
    st = wait_job(c, env, job, out)
    log = (out / f"slurm-{job}.out").read_text()
    print(f"sbatch 2 nodes x 1 task (deepspeed launcher, 1 slot each), USR1 mid-run: {time.time() - t0:.1f}s")
    assert st["NodeList"] == "node[1-2]" and "master node1:" in log
    assert (out / f"hostfile.{job}").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert "stopped by SIGUSR1 at step" in log, log[-4000:]
    first = int(re.search(r"stopped by SIGUSR1 at step (\d+)", log).group(1))
    assert 2 <= first < 200 and first % 2 == 0 and complete_steps(out) == [first]
    assert st["JobState"] == "FAILED" and st["ExitCode"] == "75:0" and "not requeueing" in log, log[-4000:]
    assert (out / "checkpoints" / f"global_step{first}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()

    # job 2, "srun" style (a task per node = a rank per node): resumes from job 1's checkpoint; mid-run the rank on
    # node2 stops answering (SIGSTOP): rank 0 names it within MFF_DS_PEER_TIMEOUT_S and every rank ends, exit 69;
    # the script requeues the job; SLURM gives it node1 and node2 again (a running job takes no new exclusion), the
    # script leaves node2 out of the step, and the run resumes on node1 alone (world 2 -> 1: a universal
    # checkpoint) and completes
    t0 = time.time()
    last = first + 20
    job = sbatch(c, env, out, ["--max-steps", str(last)], MFF_DS_PEER_TIMEOUT_S="6",
                 MFF_DS_COLLECTIVE_TIMEOUT_S="300")
    wait_for(lambda: len(steps_logged(out)) >= first + 2, 120, "job 2 to train 2 steps", None,
             out / f"slurm-{job}.out")
    rank1 = [p for p in c.pids("node2") if b"pretrain.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGSTOP)
    wait_for(lambda: (lambda s: s.get("JobState") == "PENDING" and int(s.get("Restarts", 0)) >= 1)(
        job_state(c, env, job)), 120, "the requeue after the lost peer", None, out / f"slurm-{job}.out")
    # Slurm holds a requeued job for ~2 minutes; start it as soon as the first run has left the nodes (a start
    # in the same second as the requeue is refused: "Job credential revoked")
    wait_for(lambda: all_idle(c, env), 60, "the nodes to be idle again")
    idle_at = int(time.time())
    wait_for(lambda: int(time.time()) > idle_at, 5, "the next second (Slurm's credentials have 1 s resolution)")
    slurm_cmd(c, env, "scontrol", "update", f"JobId={job}", "StartTime=now")
    st = wait_job(c, env, job, out)
    log = (out / f"slurm-{job}.out").read_text()
    print(f"sbatch 2 nodes x 1 task (srun): resume, a rank frozen, requeue without its host, resume, "
          f"{last - first} steps: {time.time() - t0:.1f}s")
    assert f"at step {first} " in log and "resumed from" in log, log[-4000:]
    lost = re.search(r"pretrain.sbatch: (lost peer: rank 1 on node2 \(no heartbeat for 6 s\) at step (\d+); "
                     r"newest complete checkpoint \S+global_step(\d+);[^\n]*\[exit 69\])", log)
    assert lost, log[-4000:]
    at, saved = int(lost.group(2)), int(lost.group(3))
    assert f"pretrain.sbatch: lost peer; requeueing job {job} (restart 1 of 3) leaving out node2" in log
    assert int(st["Restarts"]) == 1 and st["NodeList"] == "node[1-2]" and saved <= at
    assert "pretrain.sbatch: leaving out node2 (lost in an earlier attempt of this job): 1 node(s)" in log
    assert f"at step {saved} " in log.split("leaving out node2 (lost")[1]
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


@pytest.mark.parametrize("sig, how", [(signal.SIGSTOP, "no heartbeat for 5 s"),
                                      (signal.SIGKILL, "a collective failed (RuntimeError: ")])
def test_a_lost_rank_ends_the_run_named_instead_of_hanging(tmp_path, sig, how):
    """No launcher to watch the ranks (two bare processes, as srun starts them), the default 30-minute collective
    timeout. Rank 1 stops answering (SIGSTOP): rank 0's heartbeat watch ends the run within MFF_DS_PEER_TIMEOUT_S.
    Rank 1 is killed: rank 0's next collective fails (its sockets reset) and the stopped heartbeat names rank 1.
    Either way rank 0's last line names rank 1, exit 69."""
    collective_s, peer_s = "1800", "5"
    need()
    out = tmp_path / "out"
    port = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"rank{rank}.log")
        env = base_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), MFF_DS_COLLECTIVE_TIMEOUT_S=collective_s, MFF_DS_PEER_TIMEOUT_S=peer_s)
        with open(logs[-1], "w") as f:
            procs.append(forkserver.popen([PY, PRETRAIN, "--config", CONFIG, "--output-dir", str(out),
                                           "--max-steps", "100000", *TINY], env=env, stdout=f,
                                          stderr=subprocess.STDOUT))
    try:
        wait_for(lambda: len(steps_logged(out)) >= 2, 120, "training to start", procs[0], logs[0])
        os.kill(procs[1].pid, sig)
        try:
            rc = procs[0].wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank 0 still blocked 60 s after rank 1 hung (collective timeout {collective_s} "
                                 f"s, peer timeout {peer_s} s)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    last = logs[0].read_text().strip().splitlines()[-1]
    assert rc == 69, last
    assert last.startswith(f"lost peer: rank 1 on {socket.gethostname()} ({how}"), last
    assert "; no complete checkpoint under" in last and last.endswith("[exit 69]")
