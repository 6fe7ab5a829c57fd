"""The frozen token embedding kept in pinned host memory: the GPU reads only the rows a batch needs.

LoRA never changes an untied token embedding (Llama-3-8B's: 1 GiB in bf16), so a Triton kernel copies a batch's
rows from page-locked host memory instead, exactly; the GPU memory it frees goes to the MLP outputs the compiled
layers keep (``SAVED_MLP_MIB``). A tied embedding stays on the GPU: the LM head reads all of it. docs/performance.md.
"""

from __future__ import annotations

import functools

from train.speed.nf4 import available  # noqa: F401 (whether the kernel can run here: Triton and a CUDA GPU, as for nf4's)

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
    ``values``: how many of a row's values each Triton program copies (a power of two)."""
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
