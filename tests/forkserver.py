"""Cheap child processes for the tests: `run` and `popen` work as subprocess.run / subprocess.Popen do for a
`python ...` command line, but the child is forked from a server that imported torch, DeepSpeed, timm and mff_ds
once per session (about 6 s), so each child skips that start-up. The child is still a process of its own (own PID,
signals, exit status, stdout/stderr), running the script, `-m` module or `-c` code as `__main__` with the given
argv, environment and working directory; `python -m torch.distributed.run --standalone --nproc_per_node N ...`
starts the N ranks as torchrun does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; the others are
stopped, SIGTERM then SIGKILL, when one fails) unless `torchrun=True` asks for the real launcher.

Only the tests' own process and their helpers use this; with a CUDA GPU (no fork after the driver is loaded) or
MFF_DS_TESTS_FORK=0 every call is a plain subprocess."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ("torch", "torchvision", "timm", "numpy", "yaml", "PIL.Image", "safetensors.torch", "deepspeed",
           "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.utils.zero_to_fp32",
           "deepspeed.checkpoint", "deepspeed.runtime.zero.muon.muon_optimizer", "torch._inductor.compile_fx",
           "torch.distributed.run", "mff_ds.models", "mff_ds.data.loader", "mff_ds.convert",
           "mff_ds.engine.trainer", "mff_ds.engine.optim", "mff_ds.pretrain", "mff_ds.pretrain.cli")


# ------------------------------------------------------------------ the server (its own process)
def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _child(req, fds, close, default_threads):
    """In the forked child: become `python ARGV` and never return."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for c in close:
            c.close()
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or default_threads))
        if os.environ.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)
        argv = req["argv"]
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        base = req["base_path"]
        import runpy
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file in argv[0]
            sys.path[:] = [os.getcwd(), *extra, *base]
            sys.modules.pop(argv[1], None)  # preloaded: run afresh as __main__, as `python -m` does
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[:] = ["", *extra, *base]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *extra, *base]
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except KeyboardInterrupt:  # as python does: sys.excepthook (torch.distributed's prefixes [rankN]:), then SIGINT
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:  # what the interpreter does on its way out
        threading._shutdown()
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def serve(path: str, ready: int) -> None:
    import importlib
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base = [p for p in sys.path[1:] if p not in pythonpath]
    import re
    import tempfile
    with tempfile.TemporaryFile() as said:  # what the imports print, which a fresh child would print too
        saved = os.dup(1), os.dup(2)
        os.dup2(said.fileno(), 1)
        os.dup2(said.fileno(), 2)
        try:
            for name in PRELOAD:
                importlib.import_module(name)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        said.seek(0)
        lines = said.read().decode(errors="replace").splitlines()
    # DeepSpeed's accelerator notice is the only start-up output today (the tests' checks of a child's output skip
    # it); anything else would be missing from forked children: refuse, so that the tests start fresh processes
    noisy = [l for l in lines if not re.search(r"\[WARNING\] \[real_accelerator.py:\d+:get_accelerator\] Setting", l)]
    if noisy:
        sys.stderr.write("the imports print more than a fresh child would show:\n" + "\n".join(noisy) + "\n")
        os.write(ready, b"noisy\n")
        return
    import torch
    default_threads = torch.get_num_threads()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    children = {}
    os.write(ready, b"ready\n")
    os.close(ready)
    import select
    while True:
        ready, _, _ = select.select([listener, wake_r, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            return  # the tests' process is gone
        if wake_r in ready:
            try:
                while os.read(wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if listener in ready:
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            req = json.loads(msg)
            req["base_path"] = base
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.close(wake_r)
                os.close(wake_w)
                _child(req, fds, [listener, conn, *children.values()], default_threads)
            for fd in fds:
                os.close(fd)
            conn.send(json.dumps({"pid": pid}).encode())
            children[pid] = conn
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.send(json.dumps({"rc": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass
                conn.close()


# ------------------------------------------------------------------ the client (the tests' process)
_server = None
_lock = threading.Lock()


def _enabled() -> bool:
    if os.environ.get("MFF_DS_TESTS_FORK", "1") == "0":
        return False
    import torch
    return not torch.cuda.is_available()


def _address():
    """The server's socket path (started on first use, stopped with the tests' process)."""
    global _server
    with _lock:
        if _server == (None, None):
            return None
        if _server is None or _server[0].poll() is not None:
            import tempfile
            d = tempfile.mkdtemp(prefix="mff-forkserver-")
            path = os.path.join(d, "sock")
            env = {k: v for k, v in os.environ.items()  # (a child gets its own; these are the server's)
                   if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            env["PYTHONPATH"] = os.pathsep.join([REPO, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
            r, w = os.pipe()
            with open(os.path.join(d, "server.log"), "w") as log:
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path, str(w)], pass_fds=[w],
                                        stdin=subprocess.PIPE, stdout=log, stderr=log, env=env, cwd=REPO)
            os.close(w)
            with open(r, "rb") as f:
                line = f.readline()
            if line != b"ready\n":
                import warnings
                warnings.warn(f"the tests' fork server did not start ({d}/server.log): children start afresh")
                proc.stdin.close()
                _server = (None, None)
                return None
            _server = (proc, path)
            import atexit
            atexit.register(_stop, proc, d)
        return _server[1]


def _stop(proc, folder):
    proc.stdin.close()  # the server returns on EOF
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    import shutil
    shutil.rmtree(folder, ignore_errors=True)


class Proc:
    """The part of subprocess.Popen the tests use, for a child of the fork server."""

    def __init__(self, argv, env, cwd, stdin, stdout, stderr, text):
        self.args = argv
        self.returncode = None
        self.text = text
        ends, self._readers, self.stdout, self.stderr = [], [], None, None
        opened = []
        for i, spec in enumerate((stdin, stdout, stderr)):
            if spec is None or spec == subprocess.DEVNULL:
                if spec is None and i > 0:
                    ends.append(os.dup(i))
                else:
                    fd = os.open(os.devnull, os.O_RDWR)
                    ends.append(fd)
            elif spec == subprocess.PIPE:
                r, w = os.pipe()
                ends.append(w)
                f = open(r, "r" if text else "rb", closefd=True)
                self._readers.append(f)
                setattr(self, ("stdin", "stdout", "stderr")[i], f)
            elif spec == subprocess.STDOUT:
                ends.append(os.dup(ends[1]))
            elif hasattr(spec, "fileno"):
                ends.append(os.dup(spec.fileno()))
            else:
                ends.append(os.dup(spec))
            opened.append(ends[-1])
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._conn.connect(_address())
        req = {"argv": list(argv), "env": dict(os.environ if env is None else env), "cwd": str(cwd or os.getcwd())}
        socket.send_fds(self._conn, [json.dumps(req).encode()], ends)
        for fd in opened:
            os.close(fd)
        self.pid = json.loads(self._conn.recv(4096))["pid"]

    def _take(self, block, timeout=None):
        self._conn.settimeout(timeout if block else 0.0)
        try:
            msg = self._conn.recv(4096)
        except (BlockingIOError, socket.timeout):
            return
        self.returncode = json.loads(msg)["rc"] if msg else -signal.SIGKILL
        self._conn.close()

    def poll(self):
        if self.returncode is None:
            self._take(False)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            self._take(True, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        out = {}
        if not hasattr(self, "_threads"):
            def read(f):
                out[f] = f.read()
            self._out = out
            self._threads = [threading.Thread(target=read, args=(f,), daemon=True)
                             for f in (self.stdout, self.stderr) if f is not None]
            for t in self._threads:
                t.start()
        while any(t.is_alive() for t in self._threads):
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.poll()  # (Ranks: a failed rank stops the others, which closes the pipes)
            for t in self._threads:
                t.join(0.05)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return tuple(self._out.get(f) if f is not None else None for f in (self.stdout, self.stderr))


class Ranks(Proc):
    """N ranks started as `torchrun --standalone --nproc_per_node N` starts them, one exit status for all."""

    def __init__(self, argv, nproc, env, cwd, stdin, stdout, stderr, text):
        from mff_ds.engine.distributed import _free_port
        env = dict(os.environ if env is None else env)
        env.setdefault("OMP_NUM_THREADS", "1")
        common = dict(env, WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        self.args, self.returncode, self.text, self.stdin = argv, None, text, None
        self.stdout = self.stderr = None
        specs, made = [], []  # the ranks write to the same pipes, as torchrun's share its stdout and stderr
        for i, spec in enumerate((stdout, stderr)):
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                made.append(w)
                specs.append(w)
                setattr(self, ("stdout", "stderr")[i], open(r, "r" if text else "rb"))
            elif spec == subprocess.STDOUT:
                specs.append(specs[0])
            else:
                specs.append(spec)
        try:
            self._ranks = [Proc(argv, dict(common, RANK=str(r), LOCAL_RANK=str(r)), cwd, stdin, *specs, text)
                           for r in range(nproc)]
        finally:
            for w in made:
                os.close(w)
        self.pid = self._ranks[0].pid

    def _check(self):
        codes = [p.poll() for p in self._ranks]
        if self.returncode is None and any(c not in (None, 0) for c in codes):
            self._stop()
            self.returncode = 1
        elif all(c == 0 for c in codes):
            self.returncode = 0

    def _stop(self):
        for p in self._ranks:
            p.terminate()
        end = time.monotonic() + 30
        for p in self._ranks:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def poll(self):
        if self.returncode is None:
            self._check()
        return self.returncode

    def wait(self, timeout=None):
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig):
        for p in self._ranks:
            p.send_signal(sig)


def _torchrun(argv):
    """(nproc, rank argv) for `-m torch.distributed.run --standalone --nproc_per_node N script ...`, else None."""
    if argv[:2] != ["-m", "torch.distributed.run"]:
        return None
    rest, nproc, standalone = list(argv[2:]), None, False
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        if opt == "--standalone":
            standalone = True
        elif opt in ("--nproc_per_node", "--nproc-per-node"):
            nproc = int(rest.pop(0))
        elif opt.split("=")[0] in ("--nproc_per_node", "--nproc-per-node"):
            nproc = int(opt.split("=", 1)[1])
        else:
            return None
    return (nproc, rest) if standalone and nproc and rest else None


def popen(cmd, env=None, cwd=None, stdin=None, stdout=None, stderr=None, text=False, torchrun=False, **kw):
    """subprocess.Popen(cmd, ...) for cmd = [sys.executable, ...], its child forked from the warm server."""
    cmd = [str(c) for c in cmd]
    if kw or cmd[0] != sys.executable or stdin not in (None, subprocess.DEVNULL) or not _enabled() or not _address():
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text, **kw)
    ranks = None if torchrun else _torchrun(cmd[1:])
    if ranks:
        return Ranks(ranks[1], ranks[0], env, cwd, stdin, stdout, stderr, text)
    return Proc(cmd[1:], env, cwd, stdin, stdout, stderr, text)


def run(cmd, env=None, cwd=None, capture_output=False, text=False, timeout=None, check=False, stdout=None,
        stderr=None, torchrun=False):
    """subprocess.run(cmd, ...) through `popen`."""
    if capture_output:
        stdout = stderr = subprocess.PIPE
    p = popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=stderr, text=text, torchrun=torchrun)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    done = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check:
        done.check_returncode()
    return done


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
