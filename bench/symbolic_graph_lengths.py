"""Bench only: per-layer CUDA graphs with a symbolic packed length on a torch before 2.13, which cannot do it itself.

torch 2.11's partitioner leaves the packed length (a SymInt input of the joint graph) out of the backward graph's
inputs when the layer's checkpoint is inside the graph, and inductor stops with "Node add_N was invalid, but is
output"; ``train.speed.compiled.symbolic_lengths_in_graph`` therefore keeps such a torch off per-layer graphs.
:func:`enable` adds those SymInt inputs to what the forward saves for the backward (the partitioner drops any the
backward does not use) and reports the length symbolic, so a machine with torch 2.11 measures what torch 2.13 runs.
``bench/train_throughput.py --tiny --configs loraship-real --symbolic-graph-lengths`` checks it on a CPU. Never
imported by ``python -m train``.
"""

from __future__ import annotations


def enable() -> str:
    """Make per-layer graphs take a symbolic length here; what was done, for the log."""
    import torch
    import torch._functorch.partitioners as partitioners

    from train.speed import compiled

    done = "per-layer graphs: packed length symbolic"
    if not compiled.symbolic_lengths_in_graph():
        extract = partitioners._extract_fwd_bwd_modules

        def extract_saving_size_inputs(joint_module, saved_values, saved_sym_nodes, **kwargs):
            have = set(saved_sym_nodes)
            saved_sym_nodes.extend(  # in place: the caller counts the saved SymInts from this list
                node for node in joint_module.graph.find_nodes(op="placeholder")
                if partitioners._is_primal(node) and isinstance(node.meta.get("val"), torch.SymInt) and node not in have)
            return extract(joint_module, saved_values, saved_sym_nodes, **kwargs)

        partitioners._extract_fwd_bwd_modules = extract_saving_size_inputs
        compiled.symbolic_lengths_in_graph = lambda: True
        done += f" (torch {torch.__version__}: partitioner saves SymInt inputs for the backward)"
    return done
