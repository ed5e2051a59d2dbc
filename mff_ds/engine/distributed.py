"""Who am I: rank, world size and master from the deepspeed launcher, torchrun, SLURM (srun) or nothing.

`detect()` only reads the environment; `init_distributed()` also exports the standard variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), picks the device and starts the process group
(NCCL on CUDA, gloo on CPU) through `deepspeed.init_distributed`, every collective bounded by `collective_timeout`.
On CUDA with more than one rank the NCCL communicator is created eagerly (bound to the rank's device) and PyTorch's
NCCL flight recorder dumps each rank's last collectives to OUTPUT_DIR/nccl_trace/rank_<N> when a collective times
out (`flight_recorder_env`; docs/MULTINODE.md "When a rank dies or hangs").
"""
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch

from . import liveness
from .ds_compat import version_tuple


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str          # "env" (deepspeed / torchrun), "slurm" or "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist ('gpu[003-005,9],cpu1' -> 'gpu003') without scontrol."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first  # keeps zero padding: 'gpu[003-005]' -> 'gpu003'


def slurm_master(nodelist: str) -> str:
    """Master host: `scontrol show hostnames` when available, else the built-in parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return first_host(nodelist)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the launcher environment (no side effects, except a free-port probe for a single process)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed launcher, torchrun, or an srun script that set them
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "env")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        master = env.get("MASTER_ADDR") or slurm_master(nodelist)
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = int(env.get("MASTER_PORT") or 20000 + job % 20000)  # same on every task of the job
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       master, port, "slurm")
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT") or _free_port()), "single")


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


TIMEOUT_ENV = "MFF_DS_COLLECTIVE_TIMEOUT_S"  # wins over the recipe's distributed.timeout_s
DEFAULT_TIMEOUT_S = 1800.0                   # the recipe's default (engine.recipe.DistributedConfig)

# PyTorch's NCCL flight recorder, as the installed torch 2.14 reads it (torch/csrc/distributed/c10d:
# FlightRecorder.hpp reads the ring size from TORCH_FR_BUFFER_SIZE, then the older TORCH_NCCL_TRACE_BUFFER_SIZE,
# and warns that the older name is deprecated; DebugInfoWriter::getWriter reads the dump file prefix from
# TORCH_FR_DUMP_TEMP_FILE, then TORCH_NCCL_DEBUG_INFO_TEMP_FILE, when it first dumps, and appends the global rank;
# ProcessGroupNCCL.hpp: TORCH_NCCL_DUMP_ON_TIMEOUT). torch before 2.8 reads only TORCH_NCCL_TRACE_BUFFER_SIZE.
FR_BUFFER_VARS = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
FR_DUMP_ON_TIMEOUT_VAR = "TORCH_NCCL_DUMP_ON_TIMEOUT"
FR_DUMP_FILE_VARS = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
FR_BUFFER_SIZE = 2000              # collectives kept per rank (PyTorch's recommended size)
TRACE_DIR, TRACE_PREFIX = "nccl_trace", "rank_"   # OUTPUT_DIR/nccl_trace/rank_<global rank>
_fr_set: Dict[str, str] = {}       # what init_distributed set (not the user): a later run in this process moves it


def flight_recorder_env(environ: Mapping[str, str], output_dir: Optional[str],
                        torch_version: Optional[str] = None) -> Dict[str, str]:
    """The variables to set (before the NCCL process group is created) so that a collective timeout dumps each
    rank's flight recorder to OUTPUT_DIR/nccl_trace/rank_<global rank>: the ring size, dump on timeout, the dump
    file prefix (no prefix without an output dir: torch's default place). A variable the user set, or either name
    of a renamed one, is left alone. Pure: reads `environ`, changes nothing."""
    new_names = version_tuple(torch_version or torch.__version__) >= (2, 8, 0)
    out = {}
    if not any(k in environ for k in FR_BUFFER_VARS):
        # one name only: torch >= 2.8 warns on every rank when the older one is set
        out[FR_BUFFER_VARS[0] if new_names else FR_BUFFER_VARS[1]] = str(FR_BUFFER_SIZE)
    if FR_DUMP_ON_TIMEOUT_VAR not in environ:
        out[FR_DUMP_ON_TIMEOUT_VAR] = "1"
    if output_dir is not None and not any(k in environ for k in FR_DUMP_FILE_VARS):
        prefix = os.path.join(os.path.abspath(output_dir), TRACE_DIR, TRACE_PREFIX)
        out.update((k, prefix) for k in FR_DUMP_FILE_VARS)  # both: read at dump time, by old and new torch
    return out


def _eager_device(device: torch.device, world_size: int, torch_version: Optional[str] = None):
    """The device to bind the NCCL process group to at creation (device_id: the communicator is built now, so a
    rank that cannot reach the others fails at start-up, not at its first collective), or None: not CUDA; a single
    rank (torch then builds every new_group with ncclCommSplit, which has no peer: DeepSpeed #8248); torch between
    2.6.0 and 2.7.1, where device_id can hang (pytorch #153960). The same rule as DeepSpeed's TorchBackend."""
    v = version_tuple(torch_version or torch.__version__)
    if device.type != "cuda" or world_size <= 1 or (2, 6, 0) < v < (2, 7, 1):
        return None
    return device


def init_distributed(timeout_s: Optional[float] = None, output_dir: Optional[str] = None,
                     peer_timeout_s: Optional[float] = None) -> DistEnv:
    """Export the standard variables, set the device and start the process group (idempotent), and with more than
    one rank the heartbeat that ends the run when a peer is lost (liveness.py).

    timeout_s: the recipe's distributed.timeout_s (None: 1800 s); MFF_DS_COLLECTIVE_TIMEOUT_S, when set, wins.
    output_dir: the run's; on CUDA with more than one rank the flight recorder dumps into OUTPUT_DIR/nccl_trace
    (None: torch's default place). peer_timeout_s: the recipe's distributed.peer_timeout_s (None: 45 s; 0: off);
    MFF_DS_PEER_TIMEOUT_S, when set, wins."""
    import deepspeed
    import torch.distributed as dist

    d = detect()
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))
    timeout = collective_timeout(timeout_s)  # a bad MFF_DS_COLLECTIVE_TIMEOUT_S: refused before anything is made
    lost_after = liveness.lost_after_s(peer_timeout_s)  # and a bad MFF_DS_PEER_TIMEOUT_S
    device = device_for(d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if d.world_size > 1:  # hang diagnostics: what one rank waits for on the others
            _flight_recorder_on(output_dir)
    if device.type == "cpu":
        _skip_shm_comm_build()
    # DeepSpeed's own groups (data parallel, ZeRO) come from dist.new_group(), which takes torch's module default
    # (30 min), not the world group's timeout: set the default so every collective is bounded by the same limit
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        eager = _eager_device(device, d.world_size)
        store = restart_store(d, timeout)
        if eager is not None or store is not None:  # deepspeed.init_distributed adopts a group started here
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                    **({"device_id": eager} if eager is not None else {}),
                                    **({"store": store, "rank": d.rank, "world_size": d.world_size} if store else {}))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, distributed_port=d.master_port,
                                   timeout=timeout)
    if d.world_size > 1 and liveness.current() is None and lost_after > 0:
        hosts = all_gather_object(socket.gethostname())  # to name a lost peer's host without asking it
        liveness.start(d.rank, d.world_size, hosts, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                       lost_after)
    return d


SHARED_STORE_VAR = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def restart_store(d: DistEnv, timeout, environ: Optional[Mapping[str, str]] = None):
    """The store the process group starts from under torchrun's agent when it keeps one store for every restart of
    its workers (torch >= 2.4 shares its rendezvous' TCPStore with them), with a prefix per restart; None elsewhere.

    Why: torch's env:// rendezvous assumes "a new TCPStore for every retry, no prefix needed", but the agent's store
    outlives the restart: the workers of a restart read the previous attempt's gloo / NCCL addresses and fail to
    connect (`Gloo connectFullMesh failed ... Connection refused`, a dead worker's port), so `--max-restarts` never
    recovers. On one host the restart count names the attempt for every worker. On several hosts the agents count
    restarts apart (one that restarted for a failure counts it, one that restarted for the new round does not): no
    prefix can agree there, and the fix is the agents' own, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a store per
    round): refused in one line without it when restarts are asked for."""
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) or d.world_size <= 1:
        return None
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1:
        if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            from mff_ds.common import UserError
            raise UserError(f"torchrun --max-restarts over {env['GROUP_WORLD_SIZE']} hosts: expected {SHARED_STORE_VAR}"
                            f"=1 in torchrun's environment (this torch keeps one store for every restart and the "
                            f"hosts count restarts apart, so restarted ranks would not find each other; "
                            f"docs/MULTINODE.md), got {env.get(SHARED_STORE_VAR)!r}")
        return None
    import torch.distributed as dist
    client = dist.TCPStore(d.master_addr, d.master_port, d.world_size, False, timeout=timeout)
    return dist.PrefixStore(f"/mff_ds/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def _flight_recorder_on(output_dir: Optional[str]) -> None:
    """Set flight_recorder_env's variables (a value this function set earlier, for another run of this process,
    counts as unset) and create the dump folder. Again on every call: `--resume fresh` moves the folder aside
    after the first one, and the dump file prefix is read only when torch first dumps."""
    user = {k: v for k, v in os.environ.items() if _fr_set.get(k) != v}
    env = flight_recorder_env(user, output_dir)
    os.environ.update(env)
    _fr_set.update(env)
    prefix = os.environ.get(FR_DUMP_FILE_VARS[0]) or os.environ.get(FR_DUMP_FILE_VARS[1])
    if prefix and _fr_set.get(FR_DUMP_FILE_VARS[0]) == prefix:
        os.makedirs(os.path.dirname(prefix), exist_ok=True)


def collective_timeout(timeout_s: Optional[float] = None, environ: Optional[Mapping[str, str]] = None):
    """How long a collective may wait for a rank that died or hangs before it raises: MFF_DS_COLLECTIVE_TIMEOUT_S
    when set (it wins over the recipe), else `timeout_s` (the recipe's distributed.timeout_s), else 1800 s."""
    import datetime
    import math

    from mff_ds.common import UserError
    env = os.environ if environ is None else environ
    v = env.get(TIMEOUT_ENV)
    if not v:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s))
    try:
        seconds = float(v)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{TIMEOUT_ENV}: expected a positive number of seconds, got {v!r}")
    return datetime.timedelta(seconds=seconds)


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce used only by inference all-reduce
    (about a minute, needs a compiler). Training never calls it, so mark it incompatible."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    except Exception:  # a DeepSpeed without this op: nothing to skip
        pass


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj):
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
