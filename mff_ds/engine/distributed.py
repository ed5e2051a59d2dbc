"""Who am I: rank, world size and master from the deepspeed launcher, torchrun, SLURM (srun) or nothing.

`detect()` only reads the environment; `init_distributed()` also exports the standard variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), picks the device and starts the process group
(NCCL on CUDA, gloo on CPU) through `deepspeed.init_distributed`.
"""
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import torch


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


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    """Export the standard variables, set the device and start the process group (idempotent)."""
    import deepspeed
    import torch.distributed as dist

    d = detect()
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))
    device = device_for(d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        _skip_shm_comm_build()
    timeout = collective_timeout(timeout_minutes)
    # DeepSpeed's own groups (data parallel, ZeRO) come from dist.new_group(), which takes torch's module default
    # (30 min), not the world group's timeout: set the default so every collective is bounded by the same limit
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, distributed_port=d.master_port,
                                   timeout=timeout)
    return d


def collective_timeout(default_minutes: float = 30):
    """How long a collective may wait for a rank that died or hangs before it raises: MFF_DS_COLLECTIVE_TIMEOUT_S."""
    import datetime
    v = os.environ.get("MFF_DS_COLLECTIVE_TIMEOUT_S")
    try:
        seconds = float(v) if v else 60.0 * default_minutes
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise ValueError(f"MFF_DS_COLLECTIVE_TIMEOUT_S: expected a positive number of seconds, got {v!r}")
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
