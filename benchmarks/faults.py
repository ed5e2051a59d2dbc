#!/usr/bin/env python
"""Fault campaign (issue #41): a 2-host pretraining run on the test cluster rig (tests/rigs/cluster.py: node1 and
node2 train, one rank each; node3 trains nothing and holds torchrun's c10d rendezvous store), under torchrun with
`--nnodes 1:2 --max-restarts 3`, with one fault injected once per run. For each fault: the time from the fault to
the line that names it (detection), to the first optimizer step after the restart (recovery), the steps redone, and
the goodput of the whole run (engine/goodput.py), with every step logged once and the run completed unattended.

    python benchmarks/faults.py --out benchmarks/results/faults_2026-12-07     # as root; ~30 min on 2 cores
    python benchmarks/faults.py --only kill,pause_rank --steps 100             # a subset
    python benchmarks/faults.py --launcher deepspeed --out ...                 # deepspeed --hostfile over pdsh

With `--launcher deepspeed` (no restarts there: a person or a script reruns) the kill and freeze_cut faults are
injected into `deepspeed --hostfile` over pdsh (node1 launches and holds rank 0), and what is measured is how the
command ends: seconds from the fault to its exit, its exit code and its last lines; freeze_cut twice, with plain ssh
and with ssh's keepalive in PDSH_SSH_ARGS_APPEND (KEEPALIVE below; docs/MULTINODE.md).

Faults (injected once the run has logged --at steps, after its first checkpoint):
  kill        every process of node2 killed (its kernel closes their sockets: the peers see resets)
  freeze_cut  node2 frozen (SIGSTOP of all its processes) and its link cut: no socket closed, nothing answers
  hang_rank   node2's training rank stopped (SIGSTOP), its torchrun agent still running
  rank0_host  the host of rank 0 cut and killed (power lost: nothing sent), the workers' store with it
  slow_link   node2's link slowed to 50 Mbit/s (tc tbf, both ways) for 60 s: not a failure
  pause_rank  node2's rank stopped for 20 s, then continued: not a failure
The lost host stays lost: the run continues on the other one (world size 2 -> 1: the universal checkpoint and the
batch plan), as `--nnodes 1:2` allows. Wall-clock figures on a shared 2-core machine: read them as seconds of
detection and restart, not as training speed.
"""
import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
from rigs.cluster import Cluster, RigError  # noqa: E402  (the rig lives with the tests that share it)

PY = sys.executable
FAULTS = ("kill", "freeze_cut", "hang_rank", "rank0_host", "slow_link", "pause_rank")
NOT_FAILURES = ("slow_link", "pause_rank")
# the demo recipe (ViT 192-d x 6 at 64 px, 32 images per step), a checkpoint every 25 steps (asynchronous, the default)
DEMO = ["data.num_workers=0", "logging.image_every_steps=0", "logging.tensorboard=false", "logging.progress_bar=false",
        "logging.every_steps=5", "checkpoint.export=false", "checkpoint.every_steps=25"]
STORE = ("import datetime, signal, torch.distributed as d; "
         "s = d.TCPStore('0.0.0.0', 29400, None, True, timeout=datetime.timedelta(days=1), wait_for_workers=False); "
         "signal.pause()")


def logged(out: Path) -> list:
    try:
        return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError):
        return []


def attempts(out: Path) -> list:
    try:
        return json.loads((out / "goodput.json").read_text())["attempts"]
    except (OSError, ValueError, KeyError):
        return []


def rank_pid(c: Cluster, host: str):
    """(pid, global rank) of the training rank running on `host`."""
    for pid in c.pids(host):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank and b"pretrain.py" in cmd:
            return pid, int(rank[0].split(b"=")[1])
    return None, None


def until(cond, timeout, what, poll=0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(poll)
    raise RigError(f"timed out after {timeout} s waiting for {what}")


def campaign_run(fault: str, args) -> dict:
    with Cluster(3) as c:
        try:
            return _run(c, fault, args)
        except RigError:  # what the hosts said, before the rig (and its logs) goes
            for log in sorted((c.dir / fault).glob("*.log")):
                print(f"==== {log.name}\n" + "\n".join(log.read_text().splitlines()[-25:]), file=sys.stderr)
            raise


def _run(c: Cluster, fault: str, args) -> dict:
    if True:
        work = c.dir / fault
        work.mkdir()
        out = work / "out"
        c.spawn("node3", [PY, "-c", STORE], log=work / "store.log")
        time.sleep(2)
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO), MFF_DS_CACHE=str(work / "cache"), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "3",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "node3:29400", "--rdzv-id", fault,
               "--rdzv-conf", "is_host=false", str(REPO / "launch" / "pretrain.py"), "--config",
               str(REPO / "configs" / "demo.yaml"), "--output-dir", str(out), "--max-steps", str(args.steps),
               *[f"--set={kv}" for kv in DEMO]]
        agents = {h: c.spawn(h, cmd, cwd=str(REPO), env=env, log=work / f"{h}.log") for h in ("node1", "node2")}
        t0 = time.monotonic()
        until(lambda: len(logged(out)) and logged(out)[-1] >= args.at and
              (out / "checkpoints" / "latest").exists(), 600, f"{fault}: {args.at} steps and a checkpoint")
        step_at_fault = logged(out)[-1]
        before = len(attempts(out))
        pid, rank = rank_pid(c, "node2")
        rank0_host = next(h for h in ("node1", "node2") if rank_pid(c, h)[1] == 0)
        t = time.monotonic()
        lost_host = None
        if fault == "kill":
            c.kill("node2")
            lost_host = "node2"
        elif fault == "freeze_cut":
            c.cut("node2")
            c.freeze("node2")
            lost_host = "node2"
        elif fault == "hang_rank":
            os.kill(pid, signal.SIGSTOP)
        elif fault == "rank0_host":
            c.cut(rank0_host)
            c.kill(rank0_host)
            lost_host = rank0_host
        elif fault == "slow_link":
            c.slow("node2", "50mbit")
        elif fault == "pause_rank":
            os.kill(pid, signal.SIGSTOP)
        survivor = "node1" if lost_host == "node2" else "node2" if lost_host else None
        result = {"fault": fault, "step_at_fault": step_at_fault, "lost_host": lost_host,
                  "rank0_host": rank0_host, "seconds_to_fault": round(t - t0, 1)}
        if fault in NOT_FAILURES:
            time.sleep(60 if fault == "slow_link" else 20)
            if fault == "slow_link":
                c.restore("node2")
            else:
                os.kill(pid, signal.SIGCONT)
        else:
            logs = [work / f"{h}.log" for h in ("node1", "node2")]
            line = until(lambda: next((m.group(0) for f in logs if f.exists() for m in
                                       [re.search(r"(lost peer: |rank \d+ on \S+ stopped: )[^\n]*", f.read_text())]
                                       if m), None), 300, f"{fault}: the line naming the loss")
            result["detection_s"] = round(time.monotonic() - t, 1)
            result["line"] = line
            until(lambda: len(attempts(out)) > before and attempts(out)[-1]["startup_s"] > 0, 600,
                  f"{fault}: the first step after the restart")
            result["recovery_s"] = round(time.monotonic() - t, 1)
        live = [h for h in ("node1", "node2") if h != lost_host]
        for h in live:
            try:
                agents[h].wait(900)
            except subprocess.TimeoutExpired:
                raise RigError(f"{fault}: {h}'s torchrun did not finish (log {work}/{h}.log)")
        result["exit_codes"] = {h: agents[h].returncode for h in live}
        steps = logged(out)
        sys.path.insert(0, str(REPO))
        from mff_ds.engine.goodput import breakdown
        b = breakdown(attempts(out))
        result.update(completed=steps[-1:] == [args.steps], each_step_once=steps == sorted(set(steps)),
                      attempts=b["attempts"], redone_steps=b["redone_steps"], goodput=round(b["goodput"], 4),
                      breakdown={k: round(v, 2) if isinstance(v, float) else v for k, v in b.items()},
                      survivor=survivor, wall_s=round(time.monotonic() - t0, 1))
        result["false_alarm"] = fault in NOT_FAILURES and b["attempts"] > 1
        print(json.dumps(result), flush=True)
        return result


KEEPALIVE = "-o ServerAliveInterval=15 -o ServerAliveCountMax=4"


def deepspeed_run(fault: str, keepalive: bool, args) -> dict:
    """deepspeed --hostfile over pdsh on node1 and node2, `fault` injected into node2 once 30 steps are logged."""
    with Cluster(2) as c:
        work = c.dir / "ds"
        work.mkdir()
        out = work / "out"
        (work / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
                   MFF_DS_CACHE=str(work / "cache"), PATH=f"{Path(PY).parent}:{os.environ.get('PATH', '')}")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PDSH_SSH_ARGS_APPEND"):
            env.pop(k, None)
        c.run("node1", [str(REPO / "launch" / "slurm" / "deepspeed_env.sh"), ".deepspeed_env"], cwd=work, env=env,
              check=True)
        if keepalive:
            env["PDSH_SSH_ARGS_APPEND"] = KEEPALIVE
        cmd = [PY, "-m", "deepspeed.launcher.runner", "--hostfile", "hostfile", "--launcher", "pdsh", "--master_addr",
               "node1", "--master_port", "29555", str(REPO / "launch" / "pretrain.py"), "--config",
               str(REPO / "configs" / "demo.yaml"), "--output-dir", str(out), "--max-steps", "100000",
               *[f"--set={kv}" for kv in DEMO]]
        log = work / "run.log"
        p = c.spawn("node1", cmd, cwd=work, env=env, log=log)
        until(lambda: len(logged(out)) and logged(out)[-1] >= 30, 600, f"deepspeed {fault}: 30 steps")
        t = time.monotonic()
        if fault == "kill":
            c.kill("node2")
        else:
            c.cut("node2")
            c.freeze("node2")
        try:
            rc = p.wait(args.deepspeed_wait)
        except subprocess.TimeoutExpired:
            rc = None
            p.kill()
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        result = {"launcher": "deepspeed", "fault": fault, "ssh_keepalive": KEEPALIVE if keepalive else None,
                  "ended_after_s": round(time.monotonic() - t, 1) if rc is not None else None, "exit_code": rc,
                  "line": next((m.group(0) for line in lines for m in [re.search(r"lost peer: [^\n]*", line)] if m),
                               None), "last_lines": lines[-6:],
                  "traceback_in_last_lines": any("Traceback" in line for line in lines[-6:])}
        print(json.dumps(result), flush=True)
        return result


def deepspeed_table(results) -> str:
    rows = ["| fault | ssh | the deepspeed command ended after | exit code | the line | a traceback last |",
            "|---|---|---:|---:|---|---|"]
    for r in results:
        end = f"{r['ended_after_s']:.0f} s" if r["ended_after_s"] is not None else \
            f"not within {r.get('waited_s', '?')} s"
        rows.append(f"| {r['fault']} | {'keepalive' if r['ssh_keepalive'] else 'plain'} | {end} | {r['exit_code']} | "
                    f"`{(r['line'] or 'none').split(';')[0]}` | {'yes' if r['traceback_in_last_lines'] else 'no'} |")
    return "\n".join(rows)


def table(results) -> str:
    rows = ["| fault | detection | first step after the restart | steps redone | attempts | goodput | completed, "
            "each step once | the line |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        det = f"{r['detection_s']:.0f} s" if "detection_s" in r else "none (no alarm)" if not r["false_alarm"] \
            else "FALSE ALARM"
        rec = f"{r['recovery_s']:.0f} s" if "recovery_s" in r else "-"
        line = r.get("line", "").split(";")[0]
        rows.append(f"| {r['fault']} | {det} | {rec} | {r['redone_steps']} | {r['attempts']} | "
                    f"{100 * r['goodput']:.1f}% | {'yes' if r['completed'] and r['each_step_once'] else 'NO'} | "
                    f"`{line}` |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--out", default=None, help="folder for faults.json and faults.md")
    ap.add_argument("--only", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    ap.add_argument("--steps", type=int, default=160, help="optimizer steps of each run")
    ap.add_argument("--at", type=int, default=60, help="inject the fault once this many steps are logged")
    ap.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    ap.add_argument("--deepspeed-wait", type=int, default=300, help="seconds to wait for the deepspeed command to end")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("faults.py: needs root (the rig makes network, UTS and mount namespaces)")
    if args.launcher == "deepspeed":
        results = [dict(deepspeed_run(f, k, args), waited_s=args.deepspeed_wait)
                   for f, k in (("kill", False), ("freeze_cut", False), ("freeze_cut", True))]
        md = deepspeed_table(results)
        print(md)
        save(args, results, md, "faults_deepspeed")
        return
    chosen = [f.strip() for f in args.only.split(",") if f.strip()]
    bad = [f for f in chosen if f not in FAULTS]
    if bad:
        raise SystemExit(f"faults.py: --only: expected some of {', '.join(FAULTS)}, got {', '.join(bad)}")
    results = [campaign_run(f, args) for f in chosen]
    md = table(results)
    print(md)
    save(args, results, md, "faults")


def save(args, results, md, name):
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "commit": commit, "steps": args.steps,
                "at": args.at, "command": " ".join(sys.argv)}
        Path(args.out, f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        Path(args.out, f"{name}.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
