"""torch.compile over the decoder layers, and the checkpointing that runs inside or around their graphs.

What each mode and checkpoint policy buys, and why the checkpoint sits where it does, is in docs/performance.md.
"""

from __future__ import annotations

#: What ``compile_mode`` may be: what is compiled, and how.
COMPILE_MODES = {
    "layers": "torch.compile on each decoder layer (one graph shared by the layers; checkpointing around each)",
    "stack": "torch.compile on the whole decoder stack (one graph; checkpointing inside it)",
    "layers-cudagraphs": "each decoder layer compiled with CUDA graphs (mode='reduce-overhead'; checkpoint inside)",
}


def enable_checkpointing(model, kwargs: dict) -> None:
    """Checkpoint ``model``'s decoder layers with ``kwargs`` (transformers 5.23 renamed the method)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def checkpoint_kwargs(compile_mode: str = "", save_attention: bool = False,
                      save_mlp: tuple[int, int] | None = None) -> dict:
    """The keyword arguments for ``torch.utils.checkpoint`` on the decoder layers.

    Non-reentrant always. Where the checkpoints sit inside compiled graphs, also a selective policy that tags
    bitsandbytes' ops for recompute, which the partitioner would otherwise save (docs/performance.md);
    ``save_attention``: it keeps the attention outputs (:func:`save_attention_outputs`); ``save_mlp`` (the hidden
    and intermediate sizes): and the MLP's gate and up outputs (:func:`save_mlp_outputs`).
    """
    kwargs: dict = {"use_reentrant": False}
    if checkpoints_in_graph(compile_mode):
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        policy = save_attention_outputs if save_attention else recompute_quantized_matmuls
        if save_mlp is not None:
            policy = functools.partial(save_mlp_outputs, tuple(save_mlp), policy)
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    return kwargs


def recompute_quantized_matmuls(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: bitsandbytes' ops must be recomputed; the rest as plain checkpointing does."""
    from torch.utils.checkpoint import CheckpointPolicy

    if getattr(op, "namespace", None) == "bitsandbytes":
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


#: The attention kernels scaled_dot_product_attention dispatches to (aten op names), whose outputs
#: :func:`save_attention_outputs` keeps.
ATTENTION_OPS = frozenset({
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward",
})


def save_attention_outputs(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: :func:`recompute_quantized_matmuls`, but the attention kernel's outputs are saved.

    A checkpointed layer's backward pass then runs the attention kernel once (its backward) rather than
    twice: the recompute stops short of it. The cost is its output, half the size of the float32 layer
    input a checkpoint keeps anyway (bf16, one hidden vector per token).
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if getattr(getattr(op, "overloadpacket", None), "__name__", None) in ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return recompute_quantized_matmuls(ctx, op, *args, **kwargs)


def save_mlp_outputs(mlp: tuple[int, int], rest, ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: the outputs of the MLP's gate and up projections are saved (``mlp``: the
    model's hidden and intermediate sizes), every other op goes to the policy ``rest``.

    Those are the matmuls from the hidden size to the intermediate one (the frozen 4-bit weights dequantized
    in autograd's view, :func:`dequantize_once`; a LoRA adapter's own matmuls start from its rank). The
    backward pass of the SwiGLU needs both outputs; kept, the recompute stops short of the two largest
    matmuls of the layer, for two bf16 vectors of the intermediate size per token.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    hidden, intermediate = mlp
    if getattr(getattr(op, "overloadpacket", None), "__name__", None) == "mm" and len(args) >= 2:
        weight = args[1]
        if tuple(getattr(weight, "shape", ())) == (hidden, intermediate):
            return CheckpointPolicy.MUST_SAVE
    return rest(ctx, op, *args, **kwargs)


def mlp_layers_to_save(tokens: int, intermediate_size: int, saved_mlp_mib: int, layers: int) -> int:
    """How many checkpointed layers keep their MLP's gate and up outputs for a micro-batch of ``tokens``.

    As many as ``saved_mlp_mib`` holds at two bf16 vectors of ``intermediate_size`` per token and layer, and
    no more than ``layers``: 2 x 1024 tokens of an 8B (intermediate 14,336) take 112 MiB a layer, so
    896 MiB keeps 8 layers, and a folded micro-batch of 16,384 tokens (896 MiB a layer) keeps one.
    """
    per_layer = tokens * intermediate_size * 2 * 2
    if per_layer <= 0:
        return 0
    return min(layers, (saved_mlp_mib * 2**20) // per_layer)


def checkpoints_in_graph(compile_mode: str) -> bool:
    """Whether the decoder layers' checkpoints run inside the compiled graphs: with the stack compiled, and with
    per-layer CUDA graphs (a recompute outside a graph would replay it and overwrite outputs still in use)."""
    return compile_mode in ("stack", "layers-cudagraphs")


def trainer_sets_checkpointing(compile_mode: str) -> bool:
    """Whether the Trainer may turn checkpointing on again from its arguments: not under any compile mode, whose
    policy (a function) its JSON arguments cannot carry and whose layers checkpoint themselves."""
    return not compile_mode


def decoder_stack(model):
    """The module holding the decoder layers (``LlamaModel`` under a peft model), and the layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    stack = next((module for module in model.modules()
                  if any(child is layers[0] for child in getattr(module, "layers", ()))), None) if layers else None
    return stack, layers


def compile_model(model, mode: str, save_attention: bool = False, saved_mlp_mib: int = 0) -> int:
    """``torch.compile`` ``model``'s decoder (one of :data:`COMPILE_MODES`) in place; how many layers it covers.

    ``layers``: each decoder layer compiled for training steps (one graph shared by all), checkpointed around its
    graph; ``layers-cudagraphs``: with CUDA graphs, the checkpoint inside each graph; ``stack``: the whole stack as
    one graph. ``saved_mlp_mib`` (``layers-cudagraphs``): the last :func:`mlp_layers_to_save` layers of a training
    call run a second graph that keeps the MLP's gate and up outputs (:func:`save_mlp_outputs`).
    """
    import torch

    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r}: one of {', '.join(COMPILE_MODES)}")
    # One graph serves all layers; room for the few variants a run meets (train/eval, new lengths).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    stack, layers = decoder_stack(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mode.endswith("cudagraphs"):
        quiet_expected_graph_warnings()
    if mode.startswith("layers"):
        # The compiled call checkpoints the layer itself rather than leave it to transformers, whose wrapper
        # moved from around the layer's __call__ (5.17, measured) to inside its forward (5.23), which would
        # put the checkpoint inside the graph without the policy of checkpoint_kwargs.
        checkpointed = is_checkpointing(base)
        graphs = mode == "layers-cudagraphs"
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        mlp = (config.hidden_size, getattr(config, "intermediate_size", 0))
        keep_mlp = checkpointed and graphs and saved_mlp_mib > 0 and mlp[1] and mlp[1] != mlp[0]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = False
            keeps = None
            if keep_mlp:
                from_end = len(layers) - index

                def keeps(tokens, from_end=from_end):
                    return from_end <= mlp_layers_to_save(tokens, mlp[1], saved_mlp_mib, len(layers))
            compile_for_training(layer, mode="reduce-overhead" if graphs else None,
                                 checkpoint=checkpoint_kwargs(mode, save_attention) if checkpointed else None,
                                 checkpoint_in_graph=graphs,
                                 keeping=(checkpoint_kwargs(mode, save_attention, save_mlp=mlp), keeps) if keeps else None)
        return len(layers)
    if stack is None:
        raise ValueError("compile_mode: no decoder stack found in this model")
    # Non-reentrant checkpointing needs no gradient on the embeddings' output; the hook that asks for it
    # (transformers adds it with any checkpointing) breaks the graph there. transformers keeps only the
    # last hook it added, so it goes before checkpointing is set again (with the policy that recomputes
    # the 4-bit matmuls too: checkpoint_kwargs), and again after.
    def drop_input_grad_hook():
        if hasattr(base, "disable_input_require_grads") and getattr(base, "_require_grads_hooks", None):
            base.disable_input_require_grads()

    drop_input_grad_hook()
    if is_checkpointing(base):
        enable_checkpointing(base, checkpoint_kwargs(mode, save_attention))
        drop_input_grad_hook()
    compile_for_training(stack)
    return len(layers)


def quiet_expected_graph_warnings() -> None:
    """Silence two warnings that CUDA graphs of checkpointed, bucketed layers give by design, not by fault.

    Inductor warns once it has recorded graphs for more than 8 input sizes: packed rows come in a few dozen
    bucketed lengths (``packing.bucket_length``), each recorded once. And it warns that it cannot take its
    "fast path" while earlier graphs' outputs still wait for their backward: per-layer graphs always do (the
    next layer runs before the backward of the last), and the steps measured in docs/benchmarks.md ran so.
    """
    import warnings

    import torch._inductor.config as inductor

    if hasattr(inductor.triton, "cudagraph_dynamic_shape_warn_limit"):
        inductor.triton.cudagraph_dynamic_shape_warn_limit = None
    warnings.filterwarnings("ignore", message="Unable to hit fast path of CUDAGraphs")


def compile_for_training(module, mode: str | None = None, checkpoint: dict | None = None,
                         checkpoint_in_graph: bool = False, keeping: tuple | None = None) -> None:
    """``module.compile()`` for training steps only: evaluation runs the module eagerly (it would compile again).

    ``checkpoint``: ``torch.utils.checkpoint`` keyword arguments for the training calls, around the compiled module
    or, with ``checkpoint_in_graph`` (per-layer CUDA graphs), inside its graph. ``keeping``: ``(checkpoint, keeps)``,
    a second graph with that checkpoint, for the training calls whose token count ``keeps(tokens)`` accepts.
    """
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint as checkpointed

    target = module._call_impl
    if checkpoint is not None and checkpoint_in_graph:
        target = functools.partial(checkpointed, module._call_impl, **checkpoint)
    static = checkpoint_in_graph and not symbolic_lengths_in_graph()
    if checkpoint_in_graph and not static and torch_version().startswith("2.11."):
        keep_length_for_backward()
    compiled = torch.compile(target, mode=mode, dynamic=False if static else None)
    keeping_compiled, keeps = None, None
    if keeping is not None and checkpoint_in_graph:
        keeping_checkpoint, keeps = keeping
        keeping_compiled = torch.compile(functools.partial(checkpointed, module._call_impl, **keeping_checkpoint),
                                         mode=mode, dynamic=False if static else None)
    outside = checkpoint if checkpoint is not None and not checkpoint_in_graph else None

    def run_compiled(*args, **kwargs):
        chosen = compiled
        if keeps is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if keeps(hidden.numel() // hidden.shape[-1]):
                chosen = keeping_compiled
        try:
            return chosen(*args, **kwargs)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError) as err:
            raise compile_failed(err, graphs=mode == "reduce-overhead") from err

    def call(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            if outside is not None:
                return checkpointed(run_compiled, *args, **outside, **kwargs)
            return run_compiled(*args, **kwargs)
        return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call  # what nn.Module.compile sets; __call__ runs it in place of forward


def symbolic_lengths_in_graph() -> bool:
    """Whether a graph with a checkpoint inside it compiles for a symbolic packed length on this torch: 2.13 does,
    2.11 does with :func:`keep_length_for_backward`; 2.12 is untried."""
    major, minor = (int(part) for part in torch_version().split(".")[:2])
    return (major, minor) >= (2, 13) or (major, minor) == (2, 11)


def torch_version() -> str:
    import torch

    return torch.__version__


def keep_length_for_backward() -> None:
    """torch 2.11 only: make the partitioner save a graph's symbolic sizes for its backward graph.

    With the checkpoint inside the graph, torch 2.11 leaves the packed length (a SymInt input) out of the backward
    graph's inputs and inductor fails ("Node add_N was invalid, but is output"); torch 2.13 saves it itself. The
    partitioner drops any saved size the backward does not use. Idempotent.
    """
    import torch
    import torch._functorch.partitioners as partitioners

    extract = partitioners._extract_fwd_bwd_modules
    if getattr(extract, "keeps_length", False):
        return

    def extract_keeping_sizes(joint_module, saved_values, saved_sym_nodes, **kwargs):
        have = set(saved_sym_nodes)
        saved_sym_nodes.extend(  # in place: the caller counts the saved sizes from this list
            node for node in joint_module.graph.find_nodes(op="placeholder")
            if partitioners._is_primal(node) and isinstance(node.meta.get("val"), torch.SymInt) and node not in have)
        return extract(joint_module, saved_values, saved_sym_nodes, **kwargs)

    extract_keeping_sizes.keeps_length = True
    partitioners._extract_fwd_bwd_modules = extract_keeping_sizes


def compile_failed(err: Exception, graphs: bool = False) -> Exception:
    """A compiler failure in a training step as the user's error: what failed, and the setting that avoids it."""
    from train.settings import TrainError

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if not line.startswith("backend=")), type(err).__name__)
    instead = ("set TORCH_COMPILE=layers to compile without CUDA graphs, or TORCH_COMPILE=off to train without it"
               if graphs else "set TORCH_COMPILE=off to train without it")
    return TrainError(f"torch.compile failed on the decoder ({type(err).__name__}: {detail}); {instead}")
