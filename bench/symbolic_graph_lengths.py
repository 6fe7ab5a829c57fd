"""Bench only: per-layer CUDA graphs with a symbolic packed length on a torch that cannot do it itself.

``train.speed.symbolic_lengths_in_graph`` keeps per-layer graphs (``layers-cudagraphs``) at static shapes
before torch 2.13: torch 2.11's partitioner leaves the packed length (a SymInt input of the joint graph)
out of the backward graph's inputs when the layer's checkpoint is inside the graph, and inductor stops
with "Node add_N was invalid, but is output". :func:`enable` adds those SymInt inputs to the values the
forward saves for the backward (the partitioner drops any the backward does not use), and makes the length
symbolic, so the device image's torch 2.11 can measure what torch 2.13 (the train image's) does.

Reproduced and checked on the CPU with torch 2.11 and transformers 5.17 (docs/benchmarks.md, session 12):
``bench/train_throughput.py --tiny --configs layers-graphs-real`` fails without it and runs with it, to
the same losses as torch 2.13. Never imported by ``python -m train``.
"""

from __future__ import annotations


def enable() -> str:
    """Make per-layer graphs take a symbolic length here; what was done, for the log."""
    import torch
    import torch._functorch.partitioners as partitioners

    import train.speed as speed

    done = "per-layer graphs: packed length symbolic"
    if not speed.symbolic_lengths_in_graph():
        extract = partitioners._extract_fwd_bwd_modules

        def extract_saving_size_inputs(joint_module, saved_values, saved_sym_nodes, **kwargs):
            have = set(saved_sym_nodes)
            saved_sym_nodes.extend(  # in place: the caller counts the saved SymInts from this list
                node for node in joint_module.graph.find_nodes(op="placeholder")
                if partitioners._is_primal(node) and isinstance(node.meta.get("val"), torch.SymInt) and node not in have)
            return extract(joint_module, saved_values, saved_sym_nodes, **kwargs)

        partitioners._extract_fwd_bwd_modules = extract_saving_size_inputs
        speed.symbolic_lengths_in_graph = lambda: True
        done += f" (torch {torch.__version__}: partitioner saves SymInt inputs for the backward)"
    return done
