"""The frozen token embedding kept in pinned host memory: the GPU reads only the rows a batch needs.

An untied token embedding (Llama-3-8B's: 128,256 x 4,096 bf16, 1 GiB) is read only by its lookup, one
row per token, and LoRA training never changes it, so it need not hold GPU memory. Kept in page-locked
host memory, which a CUDA GPU addresses directly, it is read by a Triton kernel that copies a batch's
rows over the bus (2 x 1024 tokens of the 8B: 16 MiB). The values are the table's own, so the lookup is
exact. The memory it frees goes to the MLP outputs that per-layer CUDA graphs keep rather than compute
again (``SAVED_MLP_MIB``, train/speed.py), so the peak stays where it was.

A default with per-layer CUDA graphs (where ``SAVED_MLP_MIB`` is not 0) since session 22 (docs/benchmarks.md):
8B r8 q,k,v,o at 2 x 1024 on one H200, +4.5-5.5% tokens/s over the table on the GPU with 1 GiB of MLP outputs,
at 8.51 GiB peak. The reads alone cost 0.38 ms for 2,048 tokens (bench/host_embedding_read.py). At real lengths
it neither pays nor costs: in the steady state, each length's graphs recorded, 6,392-7,287 tok/s over six runs
against 6,603 and 6,793 with the table on the GPU and 1 GiB (session 23, +1.0%).

A tied embedding (Llama-3.2-1B/3B: the LM head's weight too) stays on the GPU: the head's matmul reads
all of it. Input ids on the CPU (tests, CPU runs) take an ordinary lookup of the same table.
"""

from __future__ import annotations

import functools

from train.nf4 import available  # noqa: F401 (whether the kernel can run here: Triton and a CUDA GPU, as for nf4's)

#: Embedding values each Triton program copies (a 4,096-wide bf16 row is four programs of 2 KiB).
VALUES_PER_PROGRAM = 1024


def movable(model) -> str | None:
    """Why ``model``'s token embedding cannot move to host memory, or None where it can."""
    import torch

    embedding = model.get_input_embeddings()
    if type(embedding) is not torch.nn.Embedding:
        return f"its token embedding is a {type(embedding).__name__}, not a plain torch Embedding"
    if embedding.max_norm is not None:
        return "its token embedding renormalizes rows (max_norm)"
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        return "its token embedding is tied to the LM head, which reads all of it"
    return None


def move_to_host(model) -> int:
    """Put ``model``'s token embedding in pinned host memory (:func:`movable` must be None); the bytes of GPU
    memory it freed. The table is frozen from here: LoRA training never updates it."""
    import torch

    embedding = model.get_input_embeddings()
    weight = embedding.weight
    table = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=torch.cuda.is_available()).copy_(weight.detach())
    freed = weight.numel() * weight.element_size() if weight.is_cuda else 0
    model.set_input_embeddings(_host_embedding_class()(table, embedding.padding_idx))
    return freed


@functools.cache
def _host_embedding_class():
    import torch

    class HostEmbedding(torch.nn.Module):
        """A frozen ``torch.nn.Embedding`` whose table is a pinned host tensor (not a parameter, so ``model.device``
        and ``model.parameters()`` stay on the GPU; not in the state dict, which LoRA checkpoints do not need)."""

        def __init__(self, table: torch.Tensor, padding_idx: int | None = None):
            super().__init__()
            self.weight = table  # a plain attribute: .to()/.cuda() leave it in host memory
            self.num_embeddings, self.embedding_dim = table.shape
            self.padding_idx = padding_idx

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            if not input_ids.is_cuda:
                return torch.nn.functional.embedding(input_ids, self.weight)
            return gather_rows(self.weight, input_ids)

        def extra_repr(self) -> str:
            return f"{self.num_embeddings}, {self.embedding_dim}, in pinned host memory"

    return HostEmbedding


def held_bytes(model) -> int:
    """Bytes of ``model``'s token embedding held in pinned host memory by :func:`move_to_host` (0 where it was not
    moved, or where no GPU took it: a CPU run's table is not pinned)."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not _host_embedding_class() or not embedding.weight.is_pinned():
        return 0
    return embedding.weight.numel() * embedding.weight.element_size()


def gather_rows(table, input_ids, values: int = VALUES_PER_PROGRAM):
    """``table[input_ids]`` on ``input_ids``' GPU, ``table`` a pinned host tensor of rows. An id outside the table
    reads nothing and gives a row of zeros (an ordinary GPU lookup would stop the process with a device assert).
    ``values``: how many of a row's values each Triton program copies (a power of two; bench/host_embedding_read.py
    times the choices)."""
    import torch

    kernel = _kernel()
    rows, width = table.shape
    ids = input_ids.reshape(-1)
    out = torch.empty((ids.numel(), width), dtype=table.dtype, device=ids.device)
    if ids.numel():
        grid = (ids.numel(), -(-width // values))
        with torch.cuda.device(ids.device):
            kernel[grid](table, ids, out, rows, width, VALUES=values)
    return out.view(*input_ids.shape, width)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gather(table, ids, out, rows, width, VALUES: tl.constexpr):
        token = tl.program_id(0)
        column = tl.program_id(1) * VALUES + tl.arange(0, VALUES)
        row = tl.load(ids + token).to(tl.int64)
        inside = (row >= 0) & (row < rows)
        values = tl.load(table + row * width + column, mask=(column < width) & inside, other=0)
        tl.store(out + token.to(tl.int64) * width + column, values, mask=column < width)

    return gather
