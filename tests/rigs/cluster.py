"""A cluster of N hosts on this one Linux machine, for the system tests (root only).

Each host is a network namespace (`ip netns`) with one veth pair into a Linux bridge, at 198.18.0.<i> in
198.18.0.0/15 (the range reserved for benchmarking: nothing real lives there, and no route leads out of it), plus a
UTS and a mount namespace held by an "anchor" process: its own hostname, /tmp, /dev/shm and /etc/hosts (every rig
host by name), the rest of the filesystem shared as on a cluster with a shared filesystem. So a test's files must
live outside /tmp: under `Cluster.dir` (in /var/tmp). Every host runs an sshd (root, by a throwaway key); commands
run through `run` / `spawn` find `ssh` (a wrapper with the rig's ssh_config) first on PATH, so `ssh node2`, pdsh and
the deepspeed launcher reach the hosts by name. The processes of a host are those in its network namespace.

    with Cluster(2) as c:                          # node1 (198.18.0.1), node2 (198.18.0.2)
        c.run("node1", ["ssh", "node2", "hostname"], capture_output=True)
        c.cut("node2"); c.restore("node2")         # link down / up: packets dropped, no socket closed
        c.slow("node2", "1mbit")                   # tbf both ways (delay/loss need netem: c.netem_missing)
        c.freeze("node2"); c.thaw("node2")         # SIGSTOP / SIGCONT every process of node2
        c.kill("node2"); c.boot("node2")           # SIGKILL all of them; start it again (fresh /tmp, sshd)
    with slurm(c) as env: c.run("node1", ["sbatch", ...], env=env)

A node that loses power sends nothing: cut() it before kill(), or its kernel closes the dead processes' sockets
(FIN/RST) and the others learn of it at once. Everything the rig makes is named PREFIX + the PID of the process that
made it; the next rig removes what a rig left whose process is gone (a test run killed before its teardown: sweep()).
`python tests/rigs/cluster.py [N]` holds a rig until Ctrl-C, to try things by hand.
"""
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PREFIX = "mffrig"
STATE = Path("/var/tmp")  # the rig's folders: on the filesystem the hosts share (each host's /tmp is its own)
BINARIES = ("ip", "tc", "unshare", "nsenter", "/usr/sbin/sshd", "ssh", "ssh-keygen")
SLURM_BINARIES = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch", "srun", "scontrol",
                  "scancel", "sinfo")


class RigError(RuntimeError):
    pass


def sh(*cmd, check=True, **kw) -> str:
    """Run a set-up command (bounded); a failure raises with the command and its stderr in one line."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    if check and r.returncode:
        raise RigError(f"{shlex.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def wait_until(cond, timeout, what):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RigError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ns_pids(ns: str) -> list:
    """The processes in network namespace `ns` (zombies have none, so they are not listed)."""
    return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).split()]


def _signal(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _kill_ns(ns: str):
    def gone():  # again until none is left: a process may fork between the listing and the signal
        _signal(ns_pids(ns), signal.SIGKILL)
        return not ns_pids(ns)
    wait_until(gone, 20, f"the processes of {ns} to die")


def sweep():
    """Remove what earlier rigs left behind whose process is gone: their processes, namespaces, links, folders."""
    def dead(name):
        m = re.match(rf"{PREFIX}(\d+)", name)
        return m is not None and not _alive(int(m.group(1)))
    for ns in (line.split()[0] for line in sh("ip", "netns", "list").splitlines()):
        if dead(ns):
            _kill_ns(ns)
            sh("ip", "netns", "del", ns, check=False)
    for link in re.findall(r"^\d+: ([^:@\s]+)", sh("ip", "-o", "link", "show"), re.M):
        if dead(link):
            sh("ip", "link", "del", link, check=False)  # a veth takes its peer along
    for d in STATE.glob(PREFIX + "*"):
        if dead(d.name):
            shutil.rmtree(d, ignore_errors=True)


class Cluster:
    def __init__(self, n: int = 2):
        if not 1 <= n <= 10:  # interface names: PREFIX + PID + "v" + one digit fit Linux's 15 characters
            raise RigError(f"Cluster: expected 1 to 10 hosts, got {n}")
        self.id = f"{PREFIX}{os.getpid()}"
        self.hosts = [f"node{i + 1}" for i in range(n)]
        self.addr = {h: f"198.18.0.{i + 1}" for i, h in enumerate(self.hosts)}
        self.mac = {h: f"02:00:c6:12:00:{i + 1:02x}" for i, h in enumerate(self.hosts)}  # locally administered
        self.dir = STATE / self.id
        self.bin = self.dir / "bin"
        self.anchor = {}   # host -> Popen of the process that holds its UTS and mount namespaces
        self.procs = []    # every Popen of spawn(), reaped at close()
        self.netem_missing: Optional[str] = None

    def ns(self, host):
        return f"{self.id}-{host}"

    def veth(self, host):  # the host's bridge port, in this machine's namespace
        return f"{self.id}v{self.hosts.index(host)}"

    # ------------------------------------------------------------------ set-up, teardown
    def __enter__(self):
        sweep()
        if any(line.startswith(self.id + "-") for line in sh("ip", "netns", "list").splitlines()):
            raise RigError(f"a rig of this process ({self.id}) is still up: one rig per process at a time")
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        d = self.dir
        self.bin.mkdir(parents=True)
        for key in ("host_key", "user_key"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.id, "-f", str(d / key))
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        # every host's sshd listens on port 22 of its own network namespace; root by the rig's key only
        (d / "sshd_config").write_text(
            f"HostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n")
        (d / "ssh_config").write_text(
            f"Host *\n  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n  ConnectTimeout 10\n")
        ssh = self.bin / "ssh"  # pdsh's ssh module and deepspeed's ssh check run `ssh` from PATH
        ssh.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {d}/ssh_config \"$@\"\n")
        ssh.chmod(0o755)
        (d / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in self.addr.items()))
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory (shared by the hosts)

        sh("ip", "link", "add", self.id, "type", "bridge")
        sh("ip", "link", "set", self.id, "up")
        for h in self.hosts:
            ns = self.ns(h)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", self.veth(h), "type", "veth", "peer", "name", "eth0", "address", self.mac[h],
               "netns", ns)
            sh("ip", "link", "set", self.veth(h), "master", self.id, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr[h]}/15", "dev", "eth0")
            for dev in ("lo", "eth0"):
                sh("ip", "-n", ns, "link", "set", dev, "up")
            # fixed neighbours: with a link cut, packets vanish (a connect times out, as to a lost node) instead
            # of ARP failing and the kernel answering "no route to host" after 3 s
            for peer in self.hosts:
                if peer != h:
                    sh("ip", "-n", ns, "neigh", "replace", self.addr[peer], "lladdr", self.mac[peer], "dev", "eth0",
                       "nud", "permanent")
        r = subprocess.run(["tc", "qdisc", "add", "dev", self.veth(self.hosts[0]), "root", "netem", "delay", "1ms"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode:
            self.netem_missing = f"tc netem is not available in this kernel ({r.stderr.strip()}): no delay or loss"
        sh("tc", "qdisc", "del", "dev", self.veth(self.hosts[0]), "root", check=False)
        for h in self.hosts:
            self.boot(h)

    def boot(self, host):
        """Start `host`: its anchor (hostname, a fresh /tmp and /dev/shm, the rig's /etc/hosts) and its sshd."""
        if self.anchor.get(host) is not None:
            raise RigError(f"{host} is up already")
        # what the rig's user runs from (the repo, its venv) stays visible where it lives in this machine's /tmp or
        # /dev/shm (a clone in /tmp): bound aside before the fresh tmpfs hides it, then back at its own path
        keep = [(k, self.dir / f"keep{i}") for i, k in enumerate(self.kept())]
        script = " && ".join(
            [f"hostname {host}"] + [f"mkdir -p {shlex.quote(str(a))} && mount --bind {shlex.quote(k)} "
                                    f"{shlex.quote(str(a))}" for k, a in keep] +
            ["mount -t tmpfs -o mode=1777 tmpfs /tmp", "mount -t tmpfs -o mode=1777 tmpfs /dev/shm"] +
            [f"mkdir -p {shlex.quote(k)} && mount --bind {shlex.quote(str(a))} {shlex.quote(k)} && "
             f"umount {shlex.quote(str(a))}" for k, a in keep] +
            [f"mount --bind {self.dir}/hosts /etc/hosts", "exec sleep infinity"])
        with open(self.dir / f"{host}.anchor.log", "w") as log:
            # unshare makes the new mount namespace's mounts private: the host's own mounts stay its own. (Not `ip
            # netns exec`: it remounts /sys, which hides /sys/fs/cgroup, and slurmd refuses to start without it.)
            p = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns(host)}", "unshare", "--uts", "--mount", "sh",
                                  "-c", script], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.anchor[host] = p

        def ready():  # the anchor became `sleep` once its mounts were made (nsenter, unshare and sh exec, not fork)
            if p.poll() is not None:
                raise RigError(f"{host}: the anchor exited {p.returncode}: "
                               f"{(self.dir / f'{host}.anchor.log').read_text().strip()}")
            with open(f"/proc/{p.pid}/comm") as f:
                return f.read().strip() == "sleep"
        wait_until(ready, 10, f"{host}'s namespaces")
        self.spawn(host, ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / "sshd_config")],
                   log=self.dir / f"{host}.sshd.log")
        wait_until(lambda: self.run(host, ["ssh", host, "true"], capture_output=True).returncode == 0, 20,
                   f"{host}'s sshd (log {self.dir}/{host}.sshd.log)")

    @staticmethod
    def kept() -> list:
        """The folders directly in /tmp or /dev/shm that hold our working directory, this Python or the rig's code:
        every host sees them (the rest of its /tmp and /dev/shm is its own)."""
        out = []
        for path in (os.getcwd(), sys.prefix, os.path.realpath(sys.executable), str(Path(__file__).resolve())):
            parts = Path(os.path.realpath(path)).parts
            for top in (("/", "tmp"), ("/", "dev", "shm")):
                if parts[:len(top)] == top and len(parts) > len(top):
                    out.append(str(Path(*parts[:len(top) + 1])))
        return sorted(set(out))

    def close(self):
        """Remove everything the rig made; also after a failed start or test (what is not there is skipped, and a
        process that will not die does not keep the rest: its error is raised at the end)."""
        errors = []
        for h in self.hosts:
            if os.path.exists(f"/run/netns/{self.ns(h)}"):
                try:
                    _kill_ns(self.ns(h))
                except RigError as e:  # e.g. stuck in the kernel (D state) on a dead mount
                    errors.append(e)
        for p in [a for a in self.anchor.values() if a is not None] + self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:  # not in a host (failed before entering it): end it here
                p.kill()
        for h in self.hosts:
            sh("ip", "link", "del", self.veth(h), check=False)
            sh("ip", "netns", "del", self.ns(h), check=False)
        sh("ip", "link", "del", self.id, check=False)
        self.anchor.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ commands on a host
    def enter(self, host, cwd=None) -> list:
        """The command prefix that runs in `host` (cwd: a folder on the shared filesystem, default ours)."""
        p = self.anchor.get(host)
        if p is None:
            raise RigError(f"{host} is down (killed): boot() it first")
        return ["nsenter", "-t", str(p.pid), "-n", "-u", "-m", f"--wdns={cwd or os.getcwd()}", "--"]

    def _env(self, env):
        env = dict(os.environ if env is None else env)
        env["PATH"] = f"{self.bin}:{env.get('PATH', os.defpath)}"
        return env

    def run(self, host, cmd, cwd=None, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
        """subprocess.run(cmd) in `host`, the rig's ssh first on PATH."""
        return subprocess.run(self.enter(host, cwd) + list(cmd), env=self._env(env), timeout=timeout, **kw)

    def spawn(self, host, cmd, cwd=None, env=None, log=None, **kw) -> subprocess.Popen:
        """subprocess.Popen(cmd) in `host` (stdout and stderr to the file `log` when given); reaped at close()."""
        if log is not None:
            with open(log, "w") as f:
                return self.spawn(host, cmd, cwd, env, stdout=f, stderr=subprocess.STDOUT, **kw)
        p = subprocess.Popen(self.enter(host, cwd) + list(cmd), env=self._env(env), stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    # ------------------------------------------------------------------ faults
    def pids(self, host) -> list:
        return ns_pids(self.ns(host))

    def kill(self, host):
        """SIGKILL every process of `host` (the host is down until boot())."""
        _kill_ns(self.ns(host))
        p = self.anchor.pop(host, None)
        if p is not None:
            p.wait(10)
        self.anchor[host] = None

    def freeze(self, host):
        """SIGSTOP every process of `host` (a hung node: its sockets stay open, nothing answers)."""
        stopped = set()
        while set(self.pids(host)) - stopped:  # again for a process forked meanwhile
            new = set(self.pids(host)) - stopped
            _signal(new, signal.SIGSTOP)
            stopped |= new

    def thaw(self, host):
        _signal(self.pids(host), signal.SIGCONT)

    def cut(self, host):
        """Take `host`'s link down at the bridge (its cable pulled): packets to and from it are dropped, no socket
        is closed; restore() brings it back."""
        sh("ip", "link", "set", self.veth(host), "down")

    def slow(self, host, rate=None, delay=None, loss=None):
        """Shape `host`'s link both ways: tbf at `rate` alone (a tc rate: "1mbit"); with `delay` ("50ms") or `loss`
        ("1%") netem, where the kernel has it (else RigError naming why: see netem_missing)."""
        if not (rate or delay or loss):
            raise RigError("slow: expected a rate, a delay or a loss")
        if delay or loss:
            if self.netem_missing:
                raise RigError(self.netem_missing)
            qdisc = ["netem", *(["delay", delay] if delay else []), *(["loss", loss] if loss else []),
                     *(["rate", rate] if rate else [])]
        else:
            qdisc = ["tbf", "rate", rate, "burst", "16kb", "latency", "100ms"]
        for ns_args, dev in (([], self.veth(host)), (["-n", self.ns(host)], "eth0")):  # to it, from it
            sh("tc", *ns_args, "qdisc", "replace", "dev", dev, "root", *qdisc)

    def restore(self, host):
        """Undo cut() and slow(): the link up, unshaped."""
        for ns_args, dev in (([], self.veth(host)), (["-n", self.ns(host)], "eth0")):
            sh("tc", *ns_args, "qdisc", "del", "dev", dev, "root", check=False)  # none there: nothing to undo
        sh("ip", "link", "set", self.veth(host), "up")


# ---------------------------------------------------------------------- SLURM on the rig
@contextlib.contextmanager
def slurm(c: Cluster, cpus: int = 1):
    """munged on every host (one key), slurmctld on the first, a slurmd on every host (`cpus` CPUs each); config
    and logs in c.dir/slurm, the daemons' sockets, PID files and spool in each host's own /tmp. Yields the
    environment for the SLURM commands, to run on a host: c.run(c.hosts[0], ["sbatch", ...], env=env)."""
    d = c.dir / "slurm"
    (d / "state").mkdir(parents=True)
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    nodes = f"node[1-{len(c.hosts)}]" if len(c.hosts) > 1 else c.hosts[0]
    conf = d / "slurm.conf"
    # ports: SLURM's defaults (6817, 6818), each host has its own
    conf.write_text(f"""ClusterName={PREFIX}
SlurmctldHost={c.hosts[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=/tmp/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir=/tmp/slurmd
SlurmctldPidFile=/tmp/slurmctld.pid
SlurmdPidFile=/tmp/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
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
NodeName={nodes} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    procs = []
    try:
        for h in c.hosts:
            procs.append(c.spawn(h, ["/usr/sbin/munged", "--foreground", "--force", f"--key-file={key}",
                                     "--socket=/tmp/munge.sock", "--pid-file=/tmp/munged.pid",
                                     f"--log-file={d}/munged-{h}.log", "--seed-file=/tmp/munge.seed"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for h in c.hosts:
            wait_until(lambda: c.run(h, ["test", "-S", "/tmp/munge.sock"]).returncode == 0, 20, f"munged on {h}")
        procs.append(c.spawn(c.hosts[0], ["/usr/sbin/slurmctld", "-D", "-i"], env=env, log=d / "slurmctld.out"))
        for h in c.hosts:
            c.run(h, ["mkdir", "-p", "/tmp/slurmd"], check=True)
            procs.append(c.spawn(h, ["/usr/sbin/slurmd", "-D"], env=env, log=d / f"slurmd-{h}.out"))

        def idle():
            r = c.run(c.hosts[0], ["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            return r.stdout.split() == ["idle"] * len(c.hosts)
        wait_until(idle, 60, f"every slurm node to be idle (logs in {d})")
        yield env
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    with Cluster(int(sys.argv[1]) if len(sys.argv) > 1 else 2) as rig:
        print(f"rig {rig.id}: {', '.join(f'{h} {a}' for h, a in rig.addr.items())}; files in {rig.dir}")
        print(f"enter a host: PATH={rig.bin}:$PATH {shlex.join(rig.enter(rig.hosts[0]))} bash    (Ctrl-C: tear down)",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
