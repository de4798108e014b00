"""One run on several processes (`torchrun`): data parallel, optionally with the frozen base
sharded by FSDP2. torch.distributed does the communication; this module holds the few rules.

- The global batch: `--batch` counts the rows of one micro-batch over all processes together.
  Every process builds the same global micro-batches (same seed, same shuffled order, same
  schedule) and runs its contiguous share of their rows, batch / world_size each. So a run
  gives the results of the single-process run with the same `--batch`, up to the order in which
  floats are summed, whatever the number of processes.
- Gradients: each process weights its loss by its labelled tokens over the labelled tokens of
  the whole global step (known everywhere, since every process holds the global batch), and
  the LoRA gradients are summed over processes in one all-reduce per optimizer step, so the
  update is the single-process one.
- FSDP (`--fsdp`): `fully_shard` on every decoder layer and on the root shards the frozen base
  and the LoRA weights, so their gradients and AdamW state are sharded too. FSDP sums the LoRA
  gradients with one reduce-scatter per backward (the losses are already weighted over the
  global step, so it sums instead of averaging). A save gathers the whole LoRA weights and
  optimizer state on every process (`whole_lora`) and rank 0 writes them, so checkpoints and
  adapters are those of a single process; a resume loads them whole and shards them again, and
  stays exact.
- Dropout: every process draws its masks from its own random stream (rank 0 the single-process
  stream, rank r > 0 one seeded from (seed, r)). Checkpoints store every process's stream, so a
  resume on the same number of processes is exact; on another number the data order, batches
  and schedule continue unchanged but dropout masks come from other streams.
- Files and output: rank 0 alone writes (checkpoints, adapters, metrics, trackers, plot, the
  progress lines) and holds the output lock. Steps that can fail on one process (file checks,
  loading, saving) run inside `agreement()`: if any process fails, every process stops and
  rank 0 prints one line naming the rank and the problem.
- A process that dies or stops answering: the others stop within `--dist-timeout` seconds (the
  process group's timeout; gloo notices a closed connection at once, torchrun stops the other
  processes of a node at once) with one line each.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn

import torch
from torch import nn

from loraforge.data.batch import Batch
from loraforge.errors import LoraforgeError

_COMM_WORDS = ("gloo", "nccl", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out",
               "Socket", "socket")


class PeerFailed(Exception):
    """Another process failed a step of an `agreement()`; rank 0 tells the user, this one exits quietly."""


def launched_world_size() -> int:
    """The number of processes torchrun started for this run (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise LoraforgeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


class Ranks:
    """This process's place in the run and the collective operations the run needs.

    With world == 1 every operation is the identity, so the single-process code path is unchanged.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, fsdp: bool = False) -> None:
        self.rank, self.world, self.local_rank, self.fsdp = rank, world, local_rank, fsdp and world > 1
        self.device = torch.device("cpu")
        self.started = False
        self.agreed_failure = False  # an agreement() failed: every process is stopping
        self.lora_sharded = False  # shard() ran: LoRA weights, gradients and optimizer state are DTensor shards

    @classmethod
    def from_env(cls, fsdp: bool = False) -> "Ranks":
        world = launched_world_size()
        if world == 1:
            return cls(fsdp=False)
        try:
            rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError):
            raise LoraforgeError("WORLD_SIZE is set but RANK is not: start several processes with torchrun "
                                 "(torchrun --nproc-per-node N -m loraforge finetune ...)") from None
        return cls(rank, world, local_rank, fsdp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective_backward(self) -> bool:
        """FSDP gathers the sharded weights again in backward: every process must run every backward."""
        return self.fsdp

    def seed_own_stream(self, seed: int) -> None:
        """Ranks > 0 draw dropout masks from their own stream, seeded from (seed, rank); rank 0 keeps
        the single-process stream."""
        if self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + 7_919 * self.rank) % (2**63))

    def device_for(self, name: str) -> torch.device:
        """The device of this process: `--device auto|cuda` takes cuda:LOCAL_RANK under torchrun."""
        from loraforge.runtime import resolve_device

        if self.world == 1:
            return resolve_device(name)
        if name.startswith("cuda:"):
            raise LoraforgeError(f"--device {name} names one GPU, but under torchrun each process takes its own "
                                 "(cuda:LOCAL_RANK): give --device cuda or auto")
        device = resolve_device(name)
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise LoraforgeError(f"LOCAL_RANK {self.local_rank}: this machine has {torch.cuda.device_count()} "
                                     "CUDA device(s); start at most that many processes per node")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # -- process group ------------------------------------------------------------------------------
    def start(self, device: torch.device, timeout_s: float) -> None:
        """Join the process group (NCCL on GPUs, gloo on CPUs); rank > 0 prints nothing from now on."""
        import torch.distributed as dist

        from loraforge.train import report

        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
            raise LoraforgeError("the process group does not match WORLD_SIZE/RANK of this process")
        self.started = True
        self.timeout_s = timeout_s
        if not self.is_main:
            report.set_quiet(True)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def stop(self, together: bool) -> None:
        """Leave the process group; `together`: every process is known to be leaving now, so wait for
        all first (a process tearing its group down while another still uses it can abort in gloo)."""
        import torch.distributed as dist

        if self.started:
            if together:
                dist.barrier()
            self.started = False
            dist.destroy_process_group()

    def _on_sigterm(self, signum, frame) -> None:
        leave(f"rank {self.rank}: stopped by the launcher (another process of this run ended, or the run was "
              "cancelled); the files saved so far are kept: run the same command to resume")

    def run(self, body: Callable[[], int]) -> NoReturn:
        """Run `body` in the process group and end the process with its exit status.

        A lost process becomes one line and status 2. Once the group is left, the process ends at
        once (os._exit, after every file is closed and the output flushed): gloo's worker threads
        can abort the interpreter's own teardown ("terminate called without an active exception",
        seen here about once in 15 runs), which would turn a finished run into a failed one."""
        together, message = False, None
        try:
            status = body()
            together = True
        except PeerFailed:
            status, together = 2, True
        except LoraforgeError as e:
            if not self.started:
                raise  # before the group exists: the command prints it as usual
            # outside agreement() errors come from what every process computes alike (a loss that
            # is no longer finite, say): rank 0 says it once
            status, together = 2, self.agreed_failure
            message = str(e) if self.is_main else None
        except BaseException as e:  # a bug (its traceback follows), a second Ctrl-C, a lost process
            if self.started and isinstance(e, Exception) and is_comm_failure(e):
                leave(f"rank {self.rank}: another process of this run ended or stopped answering "
                      f"(--dist-timeout {self.timeout_s:g} s; {short_reason(e)}); the files saved so far are "
                      "kept: run the same command to resume")
            self.stop(False)
            raise
        self.stop(together)
        if message is not None:
            leave(message)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    # -- agreement ----------------------------------------------------------------------------------
    @contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a step that can fail on some processes only (no collectives inside): if any process
        raised, all raise after it, rank 0 with the first failing rank's message, the others quietly.
        An internal error (not a LoraforgeError) keeps its traceback on the process that had it."""
        if self.world == 1:
            yield
            return
        import torch.distributed as dist

        error: Exception | None = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- every failure must reach the other processes
            error = e
        mine = None if error is None else (str(error), isinstance(error, LoraforgeError))
        reports: list[Any] = [None] * self.world
        dist.all_gather_object(reports, mine)
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if not failed:
            return
        self.agreed_failure = True
        if error is not None and (self.is_main or not isinstance(error, LoraforgeError)):
            raise error
        if self.is_main:
            rank, (message, user_error) = failed[0]
            if user_error:
                raise LoraforgeError(f"rank {rank}: {message}")
            raise LoraforgeError(f"rank {rank} stopped with an internal error ({message}); see its traceback")
        raise PeerFailed()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def copy_from_first(self, params: list[nn.Parameter]) -> None:
        """Start every process from rank 0's trainable weights (made alike from the seed anyway; this
        makes sure, as DistributedDataParallel does)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                if p.device == self.device:
                    dist.broadcast(p.data, src=0)
                else:  # --fsdp: still on the CPU before sharding; NCCL sends device tensors only
                    moved = p.data.to(self.device)
                    dist.broadcast(moved, src=0)
                    p.data.copy_(moved)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, by rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # -- the training step --------------------------------------------------------------------------
    def rows(self, batch: Batch) -> Batch:
        """This process's contiguous share of a global batch's rows ((B / world, T) when B divides).

        A process left without rows (a short last batch of length-grouped data) gets one row with
        nothing to learn, so that it still runs the model as the others do."""
        if self.world == 1:
            return batch

        def share(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.tensor_split(self.world)[self.rank]

        ids = share(batch.input_ids)
        if ids.shape[0] == 0:
            return Batch(batch.input_ids[:1], torch.full_like(batch.labels[:1], -100),
                         None if batch.doc_ids is None else batch.doc_ids[:1])
        return Batch(ids, share(batch.labels), share(batch.doc_ids))

    def sum_gradients(self, params: list[nn.Parameter], loss_sum: float, step_tokens: int) -> float:
        """Sum the LoRA gradients over processes (one all-reduce); returns the summed token-weighted loss.

        A step without a labelled token anywhere leaves no gradient, as on one process."""
        if self.world == 1:
            return loss_sum
        import torch.distributed as dist

        if step_tokens == 0:
            for p in params:
                p.grad = None
            return 0.0
        if self.lora_sharded:  # FSDP's reduce-scatter has summed them in backward
            return self.sum([loss_sum])[0]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        return self.sum([loss_sum])[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over processes, in float64."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (a Ctrl-C seen by one process stops all)."""
        if self.world == 1:
            return flag
        return self.sum([1.0 if flag else 0.0])[0] > 0

    # -- FSDP ---------------------------------------------------------------------------------------
    def shard(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              remake: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
              ) -> tuple[torch.optim.Optimizer, dict[str, tuple[int, int]]]:
        """Shard the frozen base and the LoRA weights over the processes with FSDP2 (per decoder layer,
        then the root) and move the optimizer's state onto the shards.

        Call it with whole (resumed, equal on every process) weights and optimizer state; remake(params)
        builds an empty optimizer of the same kind. Returns (the new optimizer, {"base": (this process's
        bytes, all bytes), "lora": (...)}).
        """
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
            from torch.distributed.tensor import DTensor, distribute_tensor
        except ImportError:
            raise LoraforgeError(f"--fsdp needs torch >= 2.7 (FSDP2); this is torch {torch.__version__}") from None
        frozen = [p for p in model.parameters() if not p.requires_grad]  # shared (tied) tensors once
        whole = {name: p for name, p in model.named_parameters() if p.requires_grad}
        saved = {name: optimizer.state.get(p) for name, p in whole.items()}
        totals = {"base": sum(p.numel() * p.element_size() for p in frozen),
                  "lora": sum(p.numel() * p.element_size() for p in whole.values())}
        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, "loss")  # the loop calls model.loss, not forward
        for m in model.modules():
            if isinstance(m, FSDPModule):
                if not hasattr(m, "set_force_sum_reduction_for_comms"):
                    raise LoraforgeError(f"--fsdp needs torch >= 2.8; this is torch {torch.__version__}")
                m.set_gradient_divide_factor(1.0)  # each process's loss is weighted over the global step: sum
                m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        sharded = {name: p for name, p in model.named_parameters() if p.requires_grad}
        optimizer = remake(list(sharded.values()))
        for name, p in sharded.items():
            state = saved.get(name)
            if state:
                optimizer.state[p] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                                      if torch.is_tensor(v) and v.shape == p.shape else v for k, v in state.items()}
        self.lora_sharded = True

        def local(params) -> int:
            return sum(p.to_local().numel() * p.element_size() for p in params if isinstance(p, DTensor))

        return optimizer, {"base": (local(p for p in model.parameters() if not p.requires_grad), totals["base"]),
                           "lora": (local(sharded.values()), totals["lora"])}

    @contextmanager
    def whole_lora(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Inside the block the model's LoRA weights and their optimizer state are whole tensors (gathered
        from the shards on every process: a collective, so every process enters it); the shards are put
        back after. Without sharded LoRA weights it does nothing."""
        if not self.lora_sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        for m in model.modules():  # the root keeps its weights gathered after a forward without backward
            if isinstance(m, FSDPModule):
                m.reshard()
        swapped = []
        try:
            for m in model.modules():  # the same order on every process
                for key, p in list(m._parameters.items()):
                    if isinstance(p, DTensor) and p.requires_grad:
                        whole = nn.Parameter(p.full_tensor().detach())
                        state = optimizer.state.get(p)
                        if state is not None:
                            optimizer.state[whole] = {k: v.full_tensor() if isinstance(v, DTensor) else v
                                                      for k, v in state.items()}
                        m._parameters[key] = whole
                        swapped.append((m, key, p, whole))
            yield
        finally:
            for m, key, p, whole in swapped:
                m._parameters[key] = p
                optimizer.state.pop(whole, None)


_left = False


def leave(message: str) -> None:
    """Print one error line and end the process now (status 2): a process group that lost a member
    cannot be shut down cleanly (its teardown can wait on, or abort for, the missing process)."""
    global _left
    if not _left:  # a SIGTERM arriving while the first line is printed adds no second one
        _left = True
        print(f"loraforge finetune: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def is_comm_failure(e: BaseException) -> bool:
    """An error of the process group: a lost connection or a timeout of a collective."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e) for w in _COMM_WORDS)


def short_reason(e: BaseException) -> str:
    """The backend's message without its source location, first sentence only."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0].rstrip(".")
