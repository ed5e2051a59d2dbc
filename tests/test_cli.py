"""The `mff-ds` entry point (mff_ds/cli.py): no command, the deepspeed launcher's --local_rank before the command,
abbreviated options refused by every parser, and a stop signal ending a command that saves nothing (evaluate,
convert, zoo fetch) in one line instead of a traceback."""
import ast
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forkserver
from mff_ds import cli

REPO = Path(__file__).resolve().parents[1]
COMMANDS = "pretrain, finetune, linprobe, evaluate, convert, zoo, index"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def user_lines(stderr: str) -> list:
    """stderr minus DeepSpeed's/torch's own warnings: what the user reads."""
    return [l for l in stderr.splitlines() if l.strip() and "[WARNING]" not in l and "Warning" not in l]


# ------------------------------------------------------------------ no command, --help
def test_no_command_prints_the_usage_to_stderr_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "mff-ds pretrain " in err and "mff-ds zoo " in err  # the usage, on stderr
    assert err.strip().splitlines()[-1] == f"mff-ds: expected a command, one of {COMMANDS}; got none"
    for flag in ("--help", "-h"):
        assert cli.main([flag]) == 0
        out, err = capsys.readouterr()
        assert "mff-ds pretrain " in out and err == ""
    r = forkserver.run([sys.executable, "-m", "mff_ds"], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and user_lines(r.stderr)[-1].startswith("mff-ds: expected a command")


# ------------------------------------------------------------------ deepspeed --module mff_ds
@pytest.mark.parametrize("given", [["--local_rank=3"], ["--local_rank", "3"], ["--local-rank=3"],
                                   ["--local-rank", "3"]])
def test_the_deepspeed_launchers_local_rank_before_the_command_is_taken(given, capsys, monkeypatch, tmp_path):
    """deepspeed --module mff_ds COMMAND ... runs `python -u -m mff_ds --local_rank=N COMMAND ...`
    (deepspeed/launcher/launch.py): the rank goes to LOCAL_RANK (unless the launcher set it) and the command runs."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv("MFF_DS_CACHE", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.main([*given, "zoo", "list"]) == 0
    assert os.environ["LOCAL_RANK"] == "3" and "mff_vit-b_300e" in capsys.readouterr().out
    monkeypatch.setenv("LOCAL_RANK", "1")  # the launcher's environment wins
    assert cli.main([*given, "zoo", "list"]) == 0 and os.environ["LOCAL_RANK"] == "1"
    capsys.readouterr()


def test_a_bad_local_rank_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for given, got in ((["--local_rank=x", "zoo", "list"], "'x'"), (["--local_rank"], "nothing")):
        assert cli.main(given) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"mff-ds: --local_rank: expected a non-negative integer, got {got}", err


def test_deepspeed_launcher_runs_a_command_of_the_module(tmp_path):
    """The real launcher on this CPU: `deepspeed --num_gpus 1 --module mff_ds zoo list`."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    if not deepspeed.exists():
        pytest.skip(f"no deepspeed launcher beside {sys.executable}")
    r = subprocess.run([str(deepspeed), "--num_gpus", "1", f"--master_port={_free_port()}", "--module", "mff_ds",
                        "zoo", "list"], cwd=tmp_path, env=_env(MFF_DS_CACHE=str(tmp_path / "cache")),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mff_vit-b_300e" in r.stdout


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ abbreviations
def test_every_argument_parser_refuses_abbreviations():
    """`--output mine` must not pass for `--output-dir mine` (launch/slurm/pretrain.sbatch only knows the full name):
    every ArgumentParser / add_parser in the project says allow_abbrev=False."""
    missing = []
    for folder in ("mff_ds", "launch", "benchmarks", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                        "ArgumentParser", "add_parser"):
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("allow_abbrev"), ast.Constant) and kw["allow_abbrev"].value is False):
                        missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing, f"ArgumentParser without allow_abbrev=False: {missing}"


def test_an_abbreviated_option_is_refused_in_one_line(tmp_path):
    for argv, given in ((["pretrain", "--output", "mine", "--max-steps", "1"], "--output mine"),
                        (["evaluate", "x.pth", "--val", "d", "--output", "o"], "--output o"),
                        (["convert", "to-timm", "a.pth", "b.safetensors", "--encoder"], "--encoder"),
                        (["zoo", "fetch", "x", "--he"], "--he")):
        r = forkserver.run([sys.executable, "-m", "mff_ds", *argv], env=_env(), cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2, (argv, r.stdout[-2000:], r.stderr[-2000:])
        assert user_lines(r.stderr)[-1].endswith(f"error: unrecognized arguments: {given}"), (argv, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "mine").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ stop signals
def reader_of(fifo: Path, proc, what: str, timeout=120) -> int:
    """Our write end of `fifo`, once `proc` has it open to read (the open succeeds only then); held open without
    writing, the reader stays blocked in read() until the test closes it."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: nobody reads it yet
                raise
            time.sleep(0.1)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    raise AssertionError(f"the command ended or stalled before {what}: {proc.poll()} {out[-2000:]} {err[-2000:]}")


def stop_while_reading(proc, fifo: Path, what: str, sig: str, before=lambda: None):
    """Send `sig` to `proc` once it is blocked reading `fifo` -> (stdout, stderr, what `before()` saw just then)."""
    try:
        w = reader_of(fifo, proc, what)
        try:
            seen = before()
            proc.send_signal(getattr(signal, sig))
            out, err = proc.communicate(timeout=60)
        finally:
            os.close(w)
    finally:
        proc.kill()  # (if it is still running: the test has failed)
    return out, err, seen


@pytest.mark.parametrize("sig, code", [("SIGTERM", 75), ("SIGINT", 130)])
@pytest.mark.parametrize("command", ["convert", "evaluate", "zoo"])
def test_a_stop_signal_ends_a_command_that_saves_nothing_in_one_line(tmp_path, command, sig, code):
    """Each command blocks reading a FIFO nobody writes (a checkpoint, or the zoo mirror's file): the signal ends it
    within seconds, with one line on stderr and the documented exit code (docs/RESUME.md), and nothing written."""
    from mff_ds import zoo
    env = _env(MFF_DS_CACHE=str(tmp_path / "cache"))
    if command == "convert":
        fifo, argv = tmp_path / "in.pth", ["convert", "to-timm", str(tmp_path / "in.pth"), str(tmp_path / "out.pth")]
    elif command == "evaluate":
        fifo, argv = tmp_path / "clf.pth", ["evaluate", str(tmp_path / "clf.pth"), "--val", str(tmp_path)]
    else:
        (tmp_path / "mirror").mkdir()
        fifo, argv = tmp_path / "mirror" / zoo.get("mff_vit-b_300e").filename, ["zoo", "fetch", "mff_vit-b_300e"]
        env["MFF_DS_ZOO_MIRROR"] = str(tmp_path / "mirror")
    os.mkfifo(fifo)
    p = forkserver.popen([sys.executable, "-m", "mff_ds", *argv], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err, _ = stop_while_reading(p, fifo, f"{command} read its input", sig)
    assert p.returncode == code, out[-2000:] + err[-2000:]
    assert user_lines(err) == [f"mff-ds {command}: stopped by {sig}; it saves nothing to resume: rerun the command"], \
        err
    assert not (tmp_path / "out.pth").exists()
    assert not [f for f in (tmp_path / "cache").rglob("*") if f.is_file() and not f.name.endswith(".lock")]


def test_stop_signals_raise_in_the_block_and_one_kept_from_start_up_raises_on_entry():
    """engine.signals.raising(): a stop signal inside the block raises Stopped (a BaseException: `except Exception`
    does not swallow it) at once; outside, the previous handlers are back; one catch() kept during start-up raises
    as the block begins."""
    script = """
import os, signal, time
from mff_ds.engine import signals
with signals.raising():
    pass
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
try:
    with signals.raising():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        except Exception:
            print("swallowed")
except signals.Stopped as e:
    print("inside", e.signal, e.exit_code)
signals.catch()
os.kill(os.getpid(), signal.SIGTERM)  # during start-up: kept
time.sleep(0.1)
print("kept")
try:
    with signals.raising():
        print("not reached")
except signals.Stopped as e:
    print("on entry", e.signal, e.exit_code)
"""
    r = forkserver.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["inside SIGINT 130", "kept", "on entry SIGTERM 75"], r.stdout + r.stderr


def test_help_answers_without_loading_torch():
    """`mff-ds COMMAND --help` reads no model, data or checkpoint code: torch is not imported (it took ~12 s here)."""
    probe = ("import contextlib, io, sys\nfrom mff_ds.cli import main\n"
             "for command in ('pretrain', 'finetune', 'linprobe', 'evaluate', 'convert', 'zoo', 'index'):\n"
             "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
             "        try:\n            main([command, '--help'])\n        except SystemExit as e:\n"
             "            assert e.code == 0, (command, e.code)\n"
             "    assert 'usage:' in out.getvalue(), command\n"
             "print(sorted(m for m in ('torch', 'timm', 'deepspeed') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]
