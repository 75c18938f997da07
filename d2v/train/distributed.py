"""Process-group setup for every launcher: the deepspeed launcher (--local_rank and env),
OpenMPI and Slurm (environment only), and a plain single process (world size 1).
"""
from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def map_launcher_env() -> None:
    """Fills RANK/LOCAL_RANK/WORLD_SIZE from OpenMPI or Slurm variables when the launcher set none."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return
    if "OMPI_COMM_WORLD_RANK" in env:
        env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
        env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    else:
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
    if env["WORLD_SIZE"] == "1":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(f"multi-process launch without {missing}: set them (the Slurm example derives "
                           f"MASTER_ADDR from `scontrol show hostnames` and picks a port)")


def on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") == "cpu"


def shm_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU shared-memory all-reduce keeps a rank's workspace (its shm.cpp naming)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_name(dist) -> None:
    """DeepSpeed never unlinks its CPU all-reduce workspaces: every launch on a new port left 2 x 69 MB
    in /dev/shm until memory ran out. Once every rank has mapped every peer's workspace (they do so
    inside init, and the barrier proves all are past it) the names can go; the mappings stay valid
    and the memory is freed when the last rank exits, however it exits."""
    from d2v import collectives

    collectives.barrier()
    try:
        os.unlink(shm_buffer_path(dist.get_rank()))
    except FileNotFoundError:  # no shm op (another build of DeepSpeed, or ranks on several hosts)
        pass


def planned_world_size() -> int:
    """The world size the launcher announced (WORLD_SIZE, after mapping Slurm's and OpenMPI's
    variables), read before any process group exists: the run config is resolved for it."""
    map_launcher_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> tuple[int, int]:
    """Initialises deepspeed.comm (gloo on CPU, nccl on GPU); returns (rank, world_size)."""
    import deepspeed
    import deepspeed.comm as dist

    map_launcher_env()
    if on_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(device())  # before NCCL starts: its communicators bind to this device
    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl", auto_mpi_discovery=False)
        except RuntimeError as err:  # torch's DistNetworkError is one
            if "EADDRINUSE" not in str(err) and "address already in use" not in str(err).lower():
                raise
            raise ValueError(f"MASTER_PORT {os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')} is "
                             f"already in use (another run, or a stale process of one): start with "
                             f"`deepspeed --master_port N` (torchrun --master-port N; or set MASTER_PORT)") from None
        if on_cpu():
            release_shm_name(dist)
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Leaves the process group together with the other ranks, at the successful end of an entry
    point. Exiting with the group alive let a rank's exit tear down gloo's threads while a peer still
    used them: that peer aborted ("terminate called without an active exception", exit 250) in
    about one launch in twenty. Not for error paths: the barrier would wait for ranks that are
    stuck elsewhere."""
    import deepspeed.comm as dist

    from d2v import collectives

    if not dist.is_initialized():
        return
    collectives.barrier()
    torch.distributed.destroy_process_group()


def device() -> torch.device:
    """This rank's device. LOCAL_RANK indexes the visible GPUs; where the launcher binds one GPU
    per task (Slurm's --gpus-per-task, CUDA_VISIBLE_DEVICES set per rank) only ordinal 0 exists."""
    if on_cpu():
        return torch.device("cpu")
    return torch.device("cuda", local_device_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))


def local_device_index(local_rank: int, visible: int) -> int:
    if visible <= 0:
        raise RuntimeError("no CUDA device is visible to this rank: check CUDA_VISIBLE_DEVICES and the "
                           "scheduler's GPU binding, or run on the CPU with DS_ACCELERATOR=cpu")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {visible} GPUs are visible to this rank: start "
                           f"at most {visible} ranks per node, or bind one GPU per rank")
    return local_rank


def set_cpu_threads(requested: int = 0) -> int:
    """CPU ranks share the node's cores: without this every rank starts one thread per core and
    the ranks of a node oversubscribe it. `requested` > 0 wins; OMP_NUM_THREADS is respected."""
    if not on_cpu():
        return torch.get_num_threads()
    if requested > 0:
        threads = requested
    elif "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or
                    os.environ.get("WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(threads)
    return threads
