#!/usr/bin/env python
"""Start-up cost of an ImageNet-sized ImageFolder on a network filesystem (issue #36): a 2-rank CPU start of
pretraining and of fine-tuning on a 1,281,167-file tree read over sshfs, against a 1,000-file tree, and the
directory reads of every process.

    python benchmarks/startup_scale.py --make-trees --mount                 # once (idempotent; as root)
    python benchmarks/startup_scale.py --measure --code /tmp/base --runs 3 --out /tmp/startup_base.json
    python benchmarks/startup_scale.py --measure --code . --runs 3 --out /tmp/startup_new.json \
        --compare /tmp/startup_base.json                                     # the same rig on other code

Set-up (Debian, root; --mount does the last three steps and skips what is already there):
    apt-get install -y sshfs openssh-server openssh-client
    a key pair without passphrase (--key, default /root/.ssh/id_ed25519_mffbench) in /root/.ssh/authorized_keys
    and a `Host 127.0.0.1` block (that key, no host key checks) in /root/.ssh/config;
    an sshd of its own on 127.0.0.1:--port (default 2222; config /etc/ssh/sshd_config_mffbench: root by key
    only, no password, sftp-server), checked with `ssh -p 2222 -o BatchMode=yes root@127.0.0.1 true`;
    `sshfs -p 2222 root@127.0.0.1:/data /mnt/nfs -o ro,<key options>` with sshfs's defaults otherwise
    (sshfs_options() below; so dir_cache=yes, dcache_timeout=20 s, dcache_max_size=10000, FUSE attr/entry
    timeouts 1 s). Stop them: `fusermount3 -u /mnt/nfs`, `kill $(cat /run/sshd_mffbench.pid)`.

--make-trees (under --data-root, default /data; seconds to a few minutes): `imnet_1k/train` shaped like
ImageNet-1k train (1000 classes n01440764, n01440765, ..., 1281 or 1282 files each, 1,281,167 in all, named
n01440764_<i>.JPEG), `imnet_1k/val` (1000 x 50), `small/train` (10 x 100) and `small/val` (10 x 10). Every file is
a hard link to one of 64 copies of a single 64x64 JPEG (ext4 allows 65,000 links per inode).

--measure, with --code DIR as the code (DIR/launch/*.py and PYTHONPATH=DIR; --python runs it), over the mount:
  listing   the listing alone in a fresh interpreter (import not timed): with DIR/mff_ds/data/index.py (the dataset
            index) `mff_ds.data.index.ensure(path, force=True, progress=False)` with MFF_DS_CACHE a fresh temp folder
            (one listing plus writing the index; a writable root, the local one, gets index= a file in that folder,
            so nothing is written beside the data), then, in another fresh interpreter after the same preparation,
            `ensure(path)` again: the check of the fresh index ("<mode> check"), and the index's bytes per file;
            without it `mff_ds.data.sources.scan_imagefolder(path)`.
            sshfs_cold: right after a remount (the client's caches empty; the server's page cache stays warm),
            sshfs_warm: again at once (sshfs's own dir cache, 20 s), local: the same tree on the local disk
            (page cache warm), and with --drop-caches also sshfs_cold_dropped / local_cold after
            `echo 3 > /proc/sys/vm/drop_caches` (server and client caches all cold).
  memory    the memory of one data-loader worker (acceptance for #36: the big tree within 16 MiB of the small one):
            in a fresh interpreter, `build_loader(DataConfig(source="imagefolder", path=TREE (the mount), num_workers=1,
            decode="cpu", augment="mae"), img_size=32, micro_batch=8, rank=0, world_size=1, seed=0, epoch=0)`,
            --mem-batches batches, then /proc/<pid>/smaps_rollup of the worker (the child of that process) and of the
            process itself: Private_Dirty, Private_Clean, Rss (MiB). MFF_DS_CACHE a fresh temp folder per tree, the
            index built there first (untimed, another interpreter) when the code has one. --runs runs per tree.
  pretrain  `python -m torch.distributed.run --standalone --nproc_per_node 2 DIR/launch/pretrain.py --config
            <tiny MFF, 32 px, data.path TREE> --max-steps 1`, data.num_workers 1 (--workers), micro batch 4: the wall
            time of the whole command, TREE = imnet_1k/train vs small/train, --runs runs each, the order alternating
            (ABBA), sshfs remounted before every run (cold client caches).
  finetune  the same for DIR/launch/finetune.py (a random tiny ViT, train_path TREE/train, val_path TREE/val).
  Every run gets MFF_DS_CACHE (mff_ds.common.cache_dir) empty (--index-cache fresh: a first start on the read-only
  mount) or one kept over the runs of a kind after an untimed run per tree (--index-cache shared: later starts).
  Hidden files in the tree roots (an index written beside the data) are listed, as they change what a run does.
Directory reads: a sitecustomize.py (first on PYTHONPATH) adds a `sys.addaudithook` that appends a line per
'os.scandir' / 'os.listdir' event under the data roots (os.walk scans with os.scandir) to one file per process;
each run reports, per process (launcher, rank N, child of rank N: a DataLoader worker), the directories read and
when it read the first and the last (seconds after the command started). `--check-audit` shows that the hook
sees os.walk and os.fwalk (directory fds are resolved) and nothing outside the roots.
Before each kind's timed runs, --warmup untimed small-tree runs (.pyc files, page cache); the 1-minute load
average before every run is recorded (others' work on the machine moves the absolute times).

Prints a table (median, every value; against the small tree: difference and ratio of the medians, and the
median of the paired differences, run r on both trees) and writes --out (JSON: every value, the reads per
process of every run, the recipes, the sshfs options, the commit of --code). Mind the 2 cores: every run is
sequential. --what listing,memory,pretrain,finetune picks the measurements and their order.
"""
import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# name: (classes, files); files spread as evenly as possible (the first `files % classes` classes get one more)
TREES = {"imnet_1k/train": (1000, 1_281_167), "imnet_1k/val": (1000, 50_000),
         "small/train": (10, 1_000), "small/val": (10, 100)}
BIG, SMALL = "imnet_1k", "small"
N_SOURCES = 64  # copies of the one JPEG that the files link to (ext4: at most 65,000 links per inode)
SSHD_CONFIG = "/etc/ssh/sshd_config_mffbench"
SSHD_PID = "/run/sshd_mffbench.pid"


def sshfs_options(key):
    """sshfs's defaults, plus what a non-interactive, read-only mount by key needs."""
    return f"ro,IdentityFile={key},BatchMode=yes,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null"


def sh(cmd, check=True, **kw):
    print("+", cmd if isinstance(cmd, str) else shlex.join(cmd), flush=True)
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=check, **kw)


# ------------------------------------------------------------------------------------------------------ trees
def class_name(k):
    return "n%08d" % (1440764 + k)  # n01440764 is ImageNet's first class


def make_trees(root):
    src = os.path.join(root, "_src")
    os.makedirs(src, exist_ok=True)
    sources = [os.path.join(src, f"img{i:02d}.JPEG") for i in range(N_SOURCES)]
    if not all(os.path.exists(s) for s in sources):
        from PIL import Image
        import numpy as np
        y, x = np.mgrid[0:64, 0:64]
        rgb = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype("uint8")
        Image.fromarray(rgb).save(sources[0], quality=90)
        for s in sources[1:]:
            shutil.copyfile(sources[0], s)
    for name, (classes, total) in TREES.items():
        done = os.path.join(src, name.replace("/", "_") + ".done")
        if os.path.exists(done) and open(done).read().strip() == str(total):
            print(f"{root}/{name}: there ({total} files)")
            continue
        t, n = time.time(), 0
        per, extra = divmod(total, classes)
        for k in range(classes):
            d = os.path.join(root, name, class_name(k))
            os.makedirs(d, exist_ok=True)
            for i in range(per + (k < extra)):
                try:
                    os.link(sources[n % N_SOURCES], os.path.join(d, f"{class_name(k)}_{10000 + i}.JPEG"))
                except FileExistsError:
                    pass
                n += 1
        assert n == total, (name, n, total)
        with open(done, "w") as f:
            f.write(f"{total}\n")
        print(f"{root}/{name}: {total} files in {classes} classes, {time.time() - t:.1f} s")


# ------------------------------------------------------------------------------------------------ ssh, sshfs
def listening(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ensure_key(key):
    ssh = os.path.dirname(key)
    os.makedirs(ssh, mode=0o700, exist_ok=True)
    if not os.path.exists(key):
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mff-ds startup_scale", "-f", key])
    pub = open(key + ".pub").read().strip()
    auth = os.path.join(ssh, "authorized_keys")
    have = open(auth).read() if os.path.exists(auth) else ""
    if pub not in have:
        with open(auth, "a") as f:
            f.write(("" if not have or have.endswith("\n") else "\n") + pub + "\n")
    os.chmod(auth, 0o600)
    config = os.path.join(ssh, "config")  # so that a plain `ssh -p 2222 root@127.0.0.1 true` logs in too
    block = (f"\n# benchmarks/startup_scale.py\nHost 127.0.0.1\n    IdentityFile {key}\n"
             f"    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n")
    have = open(config).read() if os.path.exists(config) else ""
    if f"IdentityFile {key}" not in have:
        with open(config, "a") as f:
            f.write(block)
    os.chmod(config, 0o600)


def ensure_sshd(port):
    config = "\n".join([
        "# sshd for benchmarks/startup_scale.py: loopback only, root by key only",
        f"Port {port}", "ListenAddress 127.0.0.1",
        "HostKey /etc/ssh/ssh_host_ed25519_key", "HostKey /etc/ssh/ssh_host_rsa_key",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "AuthorizedKeysFile .ssh/authorized_keys",
        f"PidFile {SSHD_PID}", "Subsystem sftp /usr/lib/openssh/sftp-server", ""])
    if not os.path.exists(SSHD_CONFIG) or open(SSHD_CONFIG).read() != config:
        with open(SSHD_CONFIG, "w") as f:
            f.write(config)
    if listening(port):
        print(f"sshd: something listens on 127.0.0.1:{port} already (pid file {SSHD_PID})")
        return
    sh(["ssh-keygen", "-A"])  # the host keys that are missing
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    sh(["/usr/sbin/sshd", "-t", "-f", SSHD_CONFIG])
    sh(["/usr/sbin/sshd", "-f", SSHD_CONFIG])
    for _ in range(50):
        if listening(port):
            return
        time.sleep(0.1)
    raise SystemExit(f"sshd did not start on 127.0.0.1:{port}")


def ssh_check(port, key):
    sh(["ssh", "-p", str(port), "-i", key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1", "true"])


def mounted_sshfs(mnt):
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mnt and line.split()[2] == "fuse.sshfs" for line in f)


def mount(args):
    os.makedirs(args.mnt, exist_ok=True)
    if mounted_sshfs(args.mnt):
        return False
    sh(["sshfs", "-p", str(args.port), f"root@127.0.0.1:{args.data_root}", args.mnt,
        "-o", sshfs_options(args.key)])
    return True


def umount(mnt):
    for i in range(20):
        if not mounted_sshfs(mnt):
            return
        if subprocess.run(["fusermount3", "-u", mnt], stderr=subprocess.DEVNULL).returncode == 0:
            return
        time.sleep(0.5)  # busy: a process of the last run still exiting
    sh(["fusermount3", "-uz", mnt])


def remount(args):
    umount(args.mnt)
    mount(args)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def setup(args):
    ensure_key(args.key)
    ensure_sshd(args.port)
    ssh_check(args.port, args.key)
    print("sshfs: mounted" if mount(args) else f"sshfs: {args.mnt} is mounted already")
    sh(["ls", args.mnt])


# -------------------------------------------------------------------------------------------- directory reads
SITECUSTOMIZE = r'''
"""benchmarks/startup_scale.py: log every os.scandir / os.listdir under $MFF_AUDIT_ROOTS, one file per process."""
import os
import sys

_dir, _roots = os.environ.get("MFF_AUDIT_DIR"), os.environ.get("MFF_AUDIT_ROOTS")
if _dir and _roots:
    _roots = tuple(r.rstrip("/") + "/" for r in _roots.split(os.pathsep) if r)
    _state = [None, None]  # pid, fd
    _time = __import__("time").time

    def _hook(event, args):
        if event != "os.scandir" and event != "os.listdir":
            return
        p = args[0]
        try:
            if isinstance(p, int):  # a directory fd (os.fwalk): its path
                p = os.readlink(f"/proc/self/fd/{p}")
            p = os.fsdecode(os.fspath("." if p is None else p))
        except (TypeError, OSError):
            return
        if not p.startswith("/"):
            p = os.path.join(os.getcwd(), p)
        if not (p.rstrip("/") + "/").startswith(_roots):
            return
        pid = os.getpid()
        if _state[0] != pid:  # first read of this process (or a fork of a process that read)
            _state[1] = os.open(os.path.join(_dir, f"{pid}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            _state[0] = pid
            os.write(_state[1], (f"#pid {pid} ppid {os.getppid()} rank {os.environ.get('RANK')} "
                                 f"argv {sys.argv[:3]!r}\n").encode())
        os.write(_state[1], f"{_time():.6f} {event} {p}\n".encode(errors="surrogateescape"))

    sys.addaudithook(_hook)
'''


def audit_env(work, roots, code):
    """-> (env, log dir): PYTHONPATH = the hook, then the code; a fresh log directory."""
    hook = os.path.join(work, "audit_hook")
    os.makedirs(hook, exist_ok=True)
    with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    logs = tempfile.mkdtemp(prefix="reads-", dir=work)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([hook, code]), OMP_NUM_THREADS="1",
               MFF_AUDIT_DIR=logs, MFF_AUDIT_ROOTS=os.pathsep.join(roots), PYTHONUNBUFFERED="1")
    return env, logs


def read_logs(logs, launcher_pid=None, t0=None):
    """-> per process {pid, ppid, rank, role, dirs (distinct), reads, first_s, last_s (the first and the last read,
    seconds after t0), examples (the shortest paths read)}, roles from the process tree."""
    procs = {}
    for name in os.listdir(logs):
        head, reads, times = None, [], []
        with open(os.path.join(logs, name)) as f:
            for line in f:
                if line.startswith("#"):
                    head = line.split()
                    continue
                t, _, p = line.rstrip("\n").split(" ", 2)
                times.append(float(t))
                reads.append(p)
        pid, ppid, rank = int(head[1]), int(head[3]), head[5]
        t0 = min(times) if t0 is None and times else t0
        procs[pid] = dict(pid=pid, ppid=ppid, rank=None if rank == "None" else int(rank), reads=len(reads),
                          dirs=len(set(reads)), first_s=round(min(times) - t0, 2) if times else None,
                          last_s=round(max(times) - t0, 2) if times else None,
                          examples=sorted(set(reads), key=lambda p: (len(p), p))[:3])
    for p in procs.values():
        if launcher_pid is not None and p["pid"] == launcher_pid:
            p["role"] = "launcher"
        elif p["rank"] is None:
            p["role"] = "process"
        elif launcher_pid is None or p["ppid"] == launcher_pid:
            p["role"] = f"rank {p['rank']}"
        else:
            p["role"] = f"child of rank {p['rank']}"
    return sorted(procs.values(), key=lambda p: (p["role"], p["pid"]))


def summarize_reads(procs):
    return "; ".join(f"{p['role']}: {p['dirs']} dirs ({p['reads']} reads, at {p['first_s']:.1f}-{p['last_s']:.1f} s)"
                     for p in procs) or "no directory reads"


def check_audit(args, code):
    """The hook sees os.walk (scandir inside) and os.listdir, and only under the roots."""
    work = tempfile.mkdtemp(prefix="startup_scale_check-")
    tree = os.path.join(work, "t")
    for c in ("a", "b"):
        os.makedirs(os.path.join(tree, c, "sub"))
    env, logs = audit_env(work, [tree], code)
    prog = ("import os, sys; n = sum(1 for _ in os.walk(sys.argv[1])); os.listdir(sys.argv[1]); "
            "n += sum(1 for _ in os.fwalk(sys.argv[1])); os.listdir('/'); print(n)")
    subprocess.run([args.python, "-c", prog, tree], env=env, check=True, stdout=subprocess.DEVNULL)
    procs = read_logs(logs)
    # walk and fwalk: t, t/a, t/a/sub, t/b, t/b/sub each; listdir: t; not '/'
    ok = len(procs) == 1 and procs[0]["reads"] == 11 and procs[0]["dirs"] == 5
    print(f"audit hook check: {'ok' if ok else 'FAILED'} ({summarize_reads(procs)}; expected 11 reads of 5 dirs)")
    shutil.rmtree(work)
    return ok


# ------------------------------------------------------------------------------------------------ measurement
LIST_PROG = r"""
import json, sys, time
import mff_ds
from mff_ds.data.sources import scan_imagefolder
t = time.perf_counter()
samples, classes = scan_imagefolder(sys.argv[1])
print(json.dumps({"s": time.perf_counter() - t, "files": len(samples), "classes": len(classes),
                  "mff_ds": mff_ds.__file__}))
"""

INDEX_PROG = r"""
import json, os, sys, time
import mff_ds
from mff_ds.data.index import Index, ensure
root, index, check = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "check"
t = time.perf_counter()
path, _ = ensure(root, index, progress=False, force=not check)
dt = time.perf_counter() - t
idx = Index.open(path)
print(json.dumps({"s": dt, "files": len(idx), "classes": len(idx.classes or []), "index": path,
                  "bytes": os.path.getsize(path), "mff_ds": mff_ds.__file__}))
"""

MEM_PROG = r"""
import json, os, sys
import mff_ds
from mff_ds.data import DataConfig, build_loader
cfg = DataConfig(source="imagefolder", path=sys.argv[1], num_workers=1, decode="cpu", augment="mae")
loader = build_loader(cfg, img_size=32, micro_batch=8, rank=0, world_size=1, seed=0, epoch=0)
it = iter(loader)
for _ in range(int(sys.argv[2])):
    next(it)


def rollup(pid):  # kB -> MiB
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {k.rstrip(":"): round(int(v) / 1024, 2) for k, v, *_ in (l.split() for l in f) if v.isdigit()}


kids = []
for d in os.listdir("/proc"):
    try:
        if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid():
            kids.append(int(d))
    except (OSError, IndexError):
        pass
print(json.dumps({"files": loader.num_samples,
                  "main": rollup(os.getpid()), "workers": [rollup(k) for k in kids], "mff_ds": mff_ds.__file__}))
"""

PRETRAIN_RECIPE = """\
name: startup_scale
seed: 0
model: {{arch: mff_vit_tiny_patch16, img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2,
        decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2, out_indices: [0, 1], kernels: torch}}
data: {{source: imagefolder, path: {path}, num_workers: {workers}}}
batch: {{global_batch: 8, micro_batch: 4}}
schedule: {{epochs: 2, warmup_epochs: 1}}
checkpoint: {{every_steps: 1000, keep_last: 1}}
logging: {{every_steps: 1, image_every_steps: 0, progress_bar: false, tensorboard: false}}
"""

FINETUNE_RECIPE = """\
name: startup_scale_ft
task: finetune
seed: 0
model: {{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, out_indices: [1]}}
data: {{source: imagefolder, train_path: {train}, val_path: {val}, num_workers: {workers}, pin_memory: false}}
batch: {{global_batch: 8, micro_batch: 4}}
eval_batch: 8
schedule: {{epochs: 2, warmup_epochs: 1}}
checkpoint: {{every_epochs: 1, keep_last: 1}}
logging: {{every_steps: 1, image_every_steps: 0, progress_bar: false, tensorboard: false}}
"""


def tree_paths(args, tree, where="mnt"):
    base = args.mnt if where == "mnt" else args.data_root
    return os.path.join(base, tree, "train"), os.path.join(base, tree, "val")


def has_index(code):
    return os.path.exists(os.path.join(code, "mff_ds", "data", "index.py"))


def run_prog(args, code, prog, *argv, env=None):
    """-> the last line of a fresh interpreter's output (JSON) running `prog` with `code` first on the path."""
    env = env or dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS="1")
    p = subprocess.run([args.python, "-c", prog, *argv], env=env, capture_output=True, text=True,
                       timeout=args.timeout, cwd=args.work)  # `-c` puts the cwd before PYTHONPATH: not a checkout
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: failed ({p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["mff_ds"].startswith(os.path.realpath(code)), (r["mff_ds"], code)
    return r


def measure_listing(args, code, results):
    """Fresh interpreter per listing; the import is not timed. With the dataset index: per tree, the listings that
    write the index (each into a fresh MFF_DS_CACHE; never beside the data) in the order of the modes, so that
    sshfs_warm stays warm, then the checks of those indexes, each after its mode's preparation again."""
    rows = results.setdefault("listing", {})
    indexed = has_index(code)
    results["listing_code"] = "mff_ds.data.index.ensure" if indexed else "mff_ds.data.sources.scan_imagefolder"

    def prepare(prep):
        if prep and "remount" in prep:
            remount(args)
        if prep and "drop" in prep:
            drop_caches()

    for r in range(args.runs):
        for tree in ((BIG, SMALL) if r % 2 == 0 else (SMALL, BIG)):
            modes = [("sshfs_cold", "mnt", "remount"), ("sshfs_warm", "mnt", None), ("local", "data", None)]
            if args.drop_caches:
                modes += [("sshfs_cold_dropped", "mnt", "remount+drop"), ("local_cold", "data", "drop")]
            built = []  # (mode, prep, path, env, index argument, result)
            try:
                for mode, where, prep in modes:
                    path = tree_paths(args, tree, where)[0]
                    prepare(prep)
                    if not indexed:
                        res, extra = run_prog(args, code, LIST_PROG, path), ""
                    else:
                        cache = tempfile.mkdtemp(prefix="index_cache-", dir=args.work)
                        env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS="1", MFF_DS_CACHE=cache)
                        index = os.path.join(cache, "listing.index") if os.access(path, os.W_OK) else ""
                        res = run_prog(args, code, INDEX_PROG, path, index, "build", env=env)
                        built.append((mode, prep, path, env, index, res))
                        assert res["index"].startswith(cache), (res["index"], cache)  # nothing beside the data
                        extra = f", index {res['bytes'] / res['files']:.1f} B per file"
                    row = rows.setdefault(mode, {}).setdefault(tree, {"s": [], "files": res["files"]})
                    row["s"].append(round(res["s"], 3))
                    if indexed:
                        row["index_bytes_per_file"] = round(res["bytes"] / res["files"], 1)
                    print(f"  listing {mode:<18} {tree:<9} {res['s']:8.2f} s  ({res['files']} files, "
                          f"{res['classes']} classes{extra})", flush=True)
                for mode, prep, path, env, index, res in built:  # the check of the fresh index, as a later start
                    prepare(prep)
                    chk = run_prog(args, code, INDEX_PROG, path, index, "check", env=env)
                    assert chk["index"] == res["index"] and chk["files"] == res["files"], (chk, res)
                    row = rows.setdefault(f"{mode} check", {}).setdefault(tree, {"s": [], "files": chk["files"]})
                    row["s"].append(round(chk["s"], 4))
                    print(f"  listing {mode + ' check':<18} {tree:<9} {chk['s']:8.3f} s  (ensure() of the fresh "
                          f"index {chk['index']})", flush=True)
            finally:
                for b in built:
                    shutil.rmtree(b[3]["MFF_DS_CACHE"], ignore_errors=True)


MEM_KEYS = ("Private_Dirty", "Private_Clean", "Rss")


def measure_memory(args, code, results):
    """The smaps_rollup of one data-loader worker and of its process, per tree (the mount), --runs each."""
    rows = results.setdefault("memory", {})
    results["memory_batches"] = args.mem_batches
    for r in range(args.runs):
        for tree in ((BIG, SMALL) if r % 2 == 0 else (SMALL, BIG)):
            path = tree_paths(args, tree)[0]
            cache = tempfile.mkdtemp(prefix="mem_cache-", dir=args.work)
            try:
                env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS="1", MFF_DS_CACHE=cache)
                if has_index(code):  # untimed: the run maps the index rather than listing
                    built = run_prog(args, code, INDEX_PROG, path, "", "check", env=env)
                    assert built["index"].startswith(cache), (built["index"], cache)  # nothing beside the data
                res = run_prog(args, code, MEM_PROG, path, str(args.mem_batches), env=env)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            if len(res["workers"]) != 1:
                raise SystemExit(f"memory {tree}: expected one worker process, found {len(res['workers'])}")
            row = rows.setdefault(tree, {})
            for who, m in (("worker", res["workers"][0]), ("main", res["main"])):
                for k in MEM_KEYS + ("Pss", "Shared_Clean", "Shared_Dirty"):
                    row.setdefault(who, {}).setdefault(k, []).append(m.get(k))
            w, m = res["workers"][0], res["main"]
            print(f"  memory   {tree:<9} worker private {w['Private_Dirty'] + w['Private_Clean']:8.1f} MiB "
                  f"(dirty {w['Private_Dirty']:.1f}, clean {w['Private_Clean']:.1f}, rss {w['Rss']:.1f}) | main "
                  f"private {m['Private_Dirty'] + m['Private_Clean']:.1f} MiB (dirty {m['Private_Dirty']:.1f}, "
                  f"clean {m['Private_Clean']:.1f}, rss {m['Rss']:.1f})", flush=True)


def memory_table(rows):
    """MiB, medians over the runs; big - small per field; the acceptance check on the worker's private memory."""
    med = {t: {who: {k: statistics.median(v[k]) for k in MEM_KEYS} for who, v in rows[t].items()} for t in rows}
    for t in med:
        for who in med[t]:
            med[t][who]["Private"] = med[t][who]["Private_Dirty"] + med[t][who]["Private_Clean"]
    keys = ("Private",) + MEM_KEYS
    lines = [f"{'memory (MiB, median)':<28} {'tree':<9} " + " ".join(f"{k:>14}" for k in keys)]
    for who in ("worker", "main"):
        for tree in (BIG, SMALL):
            if tree in med:
                lines.append(f"{'memory ' + who:<28} {tree:<9} " + " ".join(f"{med[tree][who][k]:14.1f}" for k in keys))
        if BIG in med and SMALL in med:
            lines.append(f"{'memory ' + who:<28} {'diff':<9} " +
                         " ".join(f"{med[BIG][who][k] - med[SMALL][who][k]:+14.1f}" for k in keys))
    if BIG in med and SMALL in med:
        d = med[BIG]["worker"]["Private"] - med[SMALL]["worker"]["Private"]
        lines.append(f"worker private memory, {BIG} - {SMALL}: {d:+.1f} MiB "
                     f"({'within' if d <= 16 else 'over'} 16 MiB)")
    return lines


def measure_runs(args, code, what, results):
    """2-rank starts (--max-steps 1), wall time of the whole command, ABBA order, remount before each."""
    rows = results.setdefault(what, {})
    reads = results.setdefault("dir_reads", {}).setdefault(what, {})
    work = os.path.join(args.work, what)
    os.makedirs(work, exist_ok=True)
    launch = os.path.join(code, "launch", "pretrain.py" if what == "pretrain" else "finetune.py")
    shared_cache = os.path.join(work, "cache_shared")
    shutil.rmtree(shared_cache, ignore_errors=True)
    order = [(-1, SMALL)] * args.warmup  # untimed: .pyc files, the page cache of the libraries
    if args.index_cache == "shared":
        order += [(-1, BIG)]  # untimed: leaves what the code caches (a dataset index) for the timed runs
    order += [(r, tree) for r in range(args.runs) for tree in ((BIG, SMALL) if r % 2 == 0 else (SMALL, BIG))]
    for r, tree in order:
        train, val = tree_paths(args, tree)
        recipe = os.path.join(work, f"{tree}.yaml")
        with open(recipe, "w") as f:
            f.write(PRETRAIN_RECIPE.format(path=train, workers=args.workers) if what == "pretrain" else
                    FINETUNE_RECIPE.format(train=train, val=val, workers=args.workers))
        out = os.path.join(work, f"out_{tree}")
        shutil.rmtree(out, ignore_errors=True)
        env, logs = audit_env(args.work, [args.mnt, args.data_root], code)
        cache = shared_cache if args.index_cache == "shared" else os.path.join(work, "cache_fresh")
        if args.index_cache == "fresh":
            shutil.rmtree(cache, ignore_errors=True)
        env["MFF_DS_CACHE"] = cache  # mff_ds.common.cache_dir(): where code may keep a listing of a read-only tree
        cmd = [args.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", launch,
               "--config", recipe, "--output-dir", out, "--max-steps", "1"]
        if not args.no_remount:
            remount(args)
        log = os.path.join(work, f"log_{tree}_{r}.txt")
        load = os.getloadavg()[0]  # others' work on the machine shows here
        t, t_wall = time.perf_counter(), time.time()
        with open(log, "w") as f:
            p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=work)
            try:
                rc = p.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = "timeout"
        dt = time.perf_counter() - t
        if rc != 0:
            raise SystemExit(f"{what} on {tree} failed ({rc}); see {log}:\n" + open(log).read()[-3000:])
        procs = read_logs(logs, launcher_pid=p.pid, t0=t_wall)
        shutil.rmtree(logs)
        if r < 0:
            print(f"  {what:<8} {tree:<9} {dt:8.2f} s  (warm-up, not counted)", flush=True)
            continue
        row = rows.setdefault(tree, {"s": [], "load1_before": []})
        row["s"].append(round(dt, 2))
        row["load1_before"].append(round(load, 2))
        reads.setdefault(tree, []).append(procs)
        print(f"  {what:<8} {tree:<9} {dt:8.2f} s  (load {load:.2f}) | {summarize_reads(procs)}", flush=True)


def fmt_row(name, tree, values, small=None):
    """median; against the small tree: difference and ratio of the medians, and the median of the differences
    of the runs made next to each other (run r on both trees: the machine's load drifts less within a pair)."""
    med = statistics.median(values)
    vals = ", ".join(f"{v:.2f}" if v >= 0.1 else f"{v:.4f}" for v in values)
    cmp = ""
    if small:
        ref = statistics.median(small)
        cmp = f"{med - ref:+8.2f} x{med / ref:7.2f}" if ref >= 0.1 else f"{med - ref:+8.2f} {'':>8}"
        if len(small) == len(values):
            cmp += f" {statistics.median(v - s for v, s in zip(values, small)):+8.2f}"
    digits = 2 if med >= 0.1 else 4  # the check of an index: milliseconds
    return f"{name:<28} {tree:<9} {med:9.{digits}f}  {cmp:<26}  [{vals}]"


def table(results):
    lines = [f"{'measurement':<28} {'tree':<9} {'median s':>9}  {'vs small: diff, ratio, paired':<26}  all values (s)"]
    for what in ("listing", "pretrain", "finetune"):
        if what not in results:
            continue
        groups = results[what].items() if what == "listing" else [("", results[what])]
        for mode, rows in groups:
            name = f"listing {mode}" if what == "listing" else f"{what} 2-rank start"
            for tree in (BIG, SMALL):
                if tree in rows:
                    lines.append(fmt_row(name, tree, rows[tree]["s"],
                                         rows[SMALL]["s"] if tree == BIG and SMALL in rows else None))
    for what, trees in results.get("dir_reads", {}).items():
        for tree, runs in trees.items():
            lines.append(f"dir reads, {what} {tree}: {summarize_reads(runs[0])}")
    if "memory" in results:
        lines += memory_table(results["memory"])
    return "\n".join(lines)


def compare(results, base):
    lines = ["against " + base.get("code", "?") + " @ " + str(base.get("commit")), ]
    for what in ("listing", "pretrain", "finetune"):
        if what not in results or what not in base:
            continue
        groups = results[what].items() if what == "listing" else [("", results[what])]
        for mode, rows in groups:
            brows = base[what].get(mode, {}) if what == "listing" else base[what]
            for tree in (BIG, SMALL):
                if tree in rows and tree in brows:
                    a, b = statistics.median(rows[tree]["s"]), statistics.median(brows[tree]["s"])
                    lines.append(f"  {what} {mode or '2-rank start':<18} {tree:<9} {b:9.2f} -> {a:9.2f} s "
                                 f"({a - b:+.2f} s" + (f", x{a / b:.2f})" if b > 0 else ")"))
            if all(t in r and len(r[t]["s"]) == len(r[SMALL]["s"]) for r in (rows, brows) for t in (BIG, SMALL)):
                a, b = (statistics.median(x - y for x, y in zip(r[BIG]["s"], r[SMALL]["s"])) for r in (rows, brows))
                lines.append(f"  {what} {mode or '2-rank start':<18} {BIG} - {SMALL} (paired): {b:9.2f} -> {a:9.2f} s")
    if "memory" in results and "memory" in base:
        for tree in (BIG, SMALL):
            if tree in results["memory"] and tree in base["memory"]:
                a, b = (statistics.median(x + y for x, y in zip(r["memory"][tree]["worker"]["Private_Dirty"],
                                                                 r["memory"][tree]["worker"]["Private_Clean"]))
                        for r in (results, base))
                lines.append(f"  memory worker private     {tree:<9} {b:9.1f} -> {a:9.1f} MiB ({a - b:+.1f} MiB)")
    return "\n".join(lines)


def commit_of(code):
    try:
        head = subprocess.run(["git", "-C", code, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", code, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def measure(args):
    code = os.path.abspath(args.code)
    os.makedirs(args.work, exist_ok=True)
    if not mounted_sshfs(args.mnt):
        raise SystemExit(f"{args.mnt}: no sshfs mount; run with --mount first")
    for tree in TREES:
        if not os.path.isdir(os.path.join(args.mnt, tree)):
            raise SystemExit(f"{args.mnt}/{tree}: missing; run with --make-trees first")
    what = [w for w in args.what.split(",") if w]
    results = {"command": shlex.join([sys.executable] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "code": code, "commit": commit_of(code), "python": args.python, "host": platform.node(),
               "cpus": os.cpu_count(), "runs": args.runs, "mount": f"root@127.0.0.1:{args.data_root} {args.mnt}",
               "sshfs_options": f"-p {args.port} -o {sshfs_options(args.key)}",
               "sshfs_version": subprocess.run(["sshfs", "--version"], capture_output=True, text=True)
               .stdout.strip().splitlines()[0], "remount_before_each_run": not args.no_remount,
               "trees": {t: {"classes": c, "files": n} for t, (c, n) in TREES.items()},
               "data_num_workers": args.workers,
               "recipes": {"pretrain": PRETRAIN_RECIPE, "finetune": FINETUNE_RECIPE}}
    results["index_cache"] = args.index_cache
    extras = sorted(os.path.join(tree, n) for tree in TREES for n in os.listdir(os.path.join(args.data_root, tree))
                    if n.startswith("."))  # e.g. an index some code wrote beside the data: it changes what runs do
    results["tree_root_extras"] = extras
    if extras:
        print(f"note: hidden files in the tree roots under {args.data_root}: {extras}")
    results["audit_hook_ok"] = check_audit(args, code)
    t0 = time.time()
    for w in what:
        print(f"== {w}", flush=True)
        if w == "listing":
            measure_listing(args, code, results)
        elif w == "memory":
            measure_memory(args, code, results)
        else:
            measure_runs(args, code, w, results)
        if args.out:  # after every part: a long measurement keeps what it has
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    results["total_s"] = round(time.time() - t0, 1)
    print()
    print(table(results))
    if args.compare:
        print(compare(results, json.load(open(args.compare))))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--make-trees", action="store_true", help="create the trees under --data-root")
    ap.add_argument("--mount", action="store_true", help="key, sshd on 127.0.0.1:--port, sshfs mount (idempotent)")
    ap.add_argument("--measure", action="store_true", help="time the listing and the 2-rank starts")
    ap.add_argument("--check-audit", action="store_true", help="only check that the audit hook sees os.walk")
    ap.add_argument("--code", default=REPO, help="the code tree to measure (default: this checkout)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs --code")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--what", default="listing,pretrain,finetune",
                    help="comma-separated: listing,memory,pretrain,finetune")
    ap.add_argument("--out", help="write the results (JSON) here")
    ap.add_argument("--compare", help="a JSON of an earlier --measure: print the medians side by side")
    ap.add_argument("--data-root", default="/data")
    ap.add_argument("--mnt", default="/mnt/nfs")
    ap.add_argument("--port", type=int, default=2222)
    ap.add_argument("--key", default="/root/.ssh/id_ed25519_mffbench")
    ap.add_argument("--work", default="/tmp/startup_scale", help="recipes, outputs, logs of the runs")
    ap.add_argument("--workers", type=int, default=1, help="data.num_workers of the runs")
    ap.add_argument("--drop-caches", action="store_true",
                    help="listing: also the fully cold case (echo 3 > /proc/sys/vm/drop_caches)")
    ap.add_argument("--no-remount", action="store_true", help="runs: keep the mount (warm sshfs caches)")
    ap.add_argument("--index-cache", choices=("fresh", "shared"), default="fresh",
                    help="runs: MFF_DS_CACHE empty for every run (fresh: a first start) or kept over the runs "
                         "(shared: one untimed run per tree first, so what the code caches is there)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed small-tree runs before each kind's runs")
    ap.add_argument("--mem-batches", type=int, default=30, help="memory: batches read before measuring")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    args = ap.parse_args()
    args.data_root, args.mnt = os.path.abspath(args.data_root), os.path.abspath(args.mnt)
    if not (args.make_trees or args.mount or args.measure or args.check_audit):
        ap.error("nothing to do: --make-trees, --mount, --measure or --check-audit")
    if args.make_trees:
        make_trees(args.data_root)
    if args.mount:
        setup(args)
    if args.check_audit and not args.measure:
        sys.exit(0 if check_audit(args, os.path.abspath(args.code)) else 1)
    if args.measure:
        measure(args)


if __name__ == "__main__":
    main()
