"""One reconstruction across processes: the ranks of a ``torch.distributed`` process group.

A stage started under ``torchrun`` (or ``srun``, :mod:`spiflow.launch`) sees ``WORLD_SIZE``
> 1, ``RANK``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` in its environment;
:func:`setup` joins the process group (NCCL on CUDA, gloo on CPU, PyTorch's ``env://``
initialisation). Each rank owns one contiguous range of frames (:func:`frame_ranges`,
aligned to the Zarr chunks so that a rank reads only its own chunks), and :class:`Ranks`
gives the few collective operations the reconstructions need: sums of tensors and of
scalars (merge numerator and weights, log-likelihoods), per-frame arrays gathered in frame
order (gains, orientations), an object broadcast from rank 0 (a checkpoint), and an error
on one rank raised on all. In one process (``world == 1``) every operation is the identity
and every mean the same ``torch`` call as without it, so one-process results are unchanged.

``Ranks.bytes_communicated`` counts the payload this rank has sent into collectives (the
size of every all-reduced or gathered tensor), to measure communication per iteration.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process's place in the process group. rank, world: ``dist.get_rank()`` and
    ``get_world_size()`` (0 and 1 without a group); device: the rank's device (``cuda:
    LOCAL_RANK`` on CUDA); owned: the group was initialised by :func:`setup` (and
    :meth:`close` destroys it)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owned: bool = False
    bytes_communicated: int = 0

    @property
    def is_root(self) -> bool:
        """True on rank 0, the one that writes checkpoints, logs and outputs."""
        return self.rank == 0

    def _count(self, t: torch.Tensor) -> None:
        self.bytes_communicated += t.numel() * t.element_size()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place (sum over ranks) and return it."""
        if self.world > 1:
            self._count(tensor)
            dist.all_reduce(tensor)
        return tensor

    def total(self, *values: float) -> list[float]:
        """The sums over ranks of the Python numbers ``values`` (one float64 all-reduce)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.sum_(t).tolist()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the per-frame tensor x (frames owned here,) over all frames, a 0-d
        tensor of x's dtype: ``x.mean()`` in one process, else Σ over ranks / Σ frames."""
        if self.world == 1:
            return x.mean()
        s, n = self.total(x.double().sum().item(), len(x))
        return torch.tensor(s / n, dtype=x.dtype, device=x.device)

    def std(self, x: torch.Tensor) -> float:
        """The unbiased standard deviation of the per-frame x over all frames (0 for one
        frame): ``x.double().std()`` in one process, else two all-reduced passes."""
        if self.world == 1:
            return x.double().std().item() if len(x) > 1 else 0.0
        s, n = self.total(x.double().sum().item(), len(x))
        if n <= 1:
            return 0.0
        (ss,) = self.total(((x.double() - s / n) ** 2).sum().item())
        return (ss / (n - 1)) ** 0.5

    def gather(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The per-frame arrays x (counts[rank], ...) of all ranks, concatenated in rank
        (= frame) order on every rank, (Σ counts, ...). Identity in one process."""
        if self.world == 1:
            return x
        width = max(counts)
        pad = torch.zeros((width,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        pad[:len(x)] = x
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        self._count(pad)
        dist.all_gather(parts, pad)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def broadcast(self, obj):
        """Rank 0's picklable ``obj`` on every rank (e.g. a loaded checkpoint)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def agree(self, exc: BaseException | None) -> None:
        """Raise on every rank if ``exc`` is not None on any rank: the own exception where
        there is one, else RuntimeError naming the failed ranks (so no rank waits forever
        in a collective for a rank that has stopped). Re-raises ``exc`` in one process."""
        if self.world == 1:
            if exc is not None:
                raise exc
            return
        flags = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        flags[self.rank] = exc is not None
        self.sum_(flags)
        if exc is not None:
            raise exc
        if flags.any():
            raise RuntimeError(f"rank(s) {flags.nonzero().flatten().tolist()} failed; see their error")

    def close(self) -> None:
        """Destroy the process group if :func:`setup` created it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False


def world_size() -> int:
    """The number of ranks the environment asks for: ``WORLD_SIZE`` (torchrun, srun via
    :mod:`spiflow.launch`), 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> Ranks:
    """Join the process group the environment describes (``WORLD_SIZE`` > 1), or return the
    one-process :class:`Ranks` (rank 0 of 1 on ``device``).

    A group already initialised (e.g. by a caller) is used as it is (``owned`` False);
    otherwise it is initialised from the environment (``env://``: ``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) with NCCL when ``device`` is CUDA, else gloo.
    On CUDA the rank's device is ``cuda:LOCAL_RANK``. Raises ValueError when WORLD_SIZE is
    not an integer ≥ 1.
    """
    try:
        world = world_size()
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} must be >= 1")
    if world == 1 and not dist.is_initialized():
        return Ranks(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device, owned)


def frame_ranges(frames: int, world: int, chunk: int = 1) -> list[tuple[int, int]]:
    """Each rank's contiguous frames ``(start, stop)``: the ⌈frames / chunk⌉ chunks of
    ``chunk`` frames (the Zarr chunking of the photons) split as evenly as whole chunks
    allow, rank r taking chunks ``⌊C r / world⌋ … ⌊C (r + 1) / world⌋``. Raises ValueError
    when there are fewer chunks than ranks (a rank would have no frame)."""
    chunk = max(1, int(chunk))
    n_chunks = -(-frames // chunk)
    if n_chunks < world:
        raise ValueError(f"{frames} frames in {n_chunks} chunks of {chunk} cannot be shared by {world} ranks; "
                         f"use fewer processes or smaller chunks (dataset.chunk_frames)")
    cuts = [min(frames, (n_chunks * r // world) * chunk) for r in range(world + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def photon_chunk(photons) -> int:
    """Frames per storage chunk of a photons array (``photons.chunks[0]`` for Zarr, 1 for
    arrays without chunks such as numpy)."""
    chunks = getattr(photons, "chunks", None)
    return int(chunks[0]) if chunks else 1


class FrameRange:
    """Frames ``start:stop`` of a photons array (frames, ny, nx), read lazily: slicing
    ``view[i0:i1]`` reads ``photons[start + i0:start + i1]`` only (a Zarr array reads just
    those chunks). Attributes ``shape``, ``dtype``, ``ndim`` as an array's."""

    def __init__(self, photons, start: int, stop: int):
        self.photons, self.start, self.stop = photons, int(start), int(stop)
        self.shape = (self.stop - self.start,) + tuple(photons.shape[1:])
        self.dtype, self.ndim = getattr(photons, "dtype", None), len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("FrameRange supports contiguous slices only")
        i0, i1, _ = key.indices(self.shape[0])
        return self.photons[self.start + i0:self.start + max(i0, i1)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of the call (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn, world: int, port: int, threads: int, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    fn(*args)


def run_local(fn, world: int, *args, threads: int = 1) -> None:
    """Run ``fn(*args)`` in ``world`` new local processes, the ranks of one process group
    (the environment torchrun would give them, rendezvous on a free local port), each with
    ``threads`` torch CPU threads; wait for all. For tests and benchmarks: ``fn`` must be
    importable by name (a module-level function) and ``args`` picklable; results go
    through files. Raises ``torch.multiprocessing.ProcessRaisedException`` when a rank
    raises (the others are terminated)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(fn, world, free_port(), threads, args), nprocs=world, join=True)
