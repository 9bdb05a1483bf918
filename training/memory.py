"""What a training step holds in memory, what it costs, and the switches that shrink it.

- `checkpoint_activations`: activation (gradient) checkpointing in a trained network: the activations
  inside each transformer block or UNet block are recomputed in the backward pass instead of being kept
  from the forward pass; the weights, their names and the results stay the same.
- `estimate`: memory per device and FLOPs per sample before the first step, from the network built and
  run once on the meta device (`TrainingOnMeta`); `PeakMemory` measures the same on real tensors.
- `shard`: FSDP2's fully_shard, block by block, for `strategy: fsdp2`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_activations(net: torch.nn.Module) -> int:
    """Turn on activation checkpointing in every part of `net` that has blocks to checkpoint: diffusers' UNets
    (their own switch), a `PriorTransformer` (which has none: each transformer block's forward is wrapped) and
    open_clip's CLIP (its own switch). Returns how many parts were switched; 0 is an error, naming the net."""
    from diffusers import PriorTransformer

    switched = 0
    for part in net.modules():
        if isinstance(part, PriorTransformer):
            for block in part.transformer_blocks:
                if not isinstance(block.forward, functools.partial):  # once, however often it is asked
                    block.forward = functools.partial(_checkpointed, block.forward)
            switched += 1
        elif getattr(part, "_supports_gradient_checkpointing", False):
            part.enable_gradient_checkpointing()
            switched += 1
        elif hasattr(part, "set_grad_checkpointing") and part is net:  # open_clip's CLIP
            part.set_grad_checkpointing(True)
            switched += 1
    if not switched:
        raise ValueError(f"gradient_checkpointing: {type(net).__name__} has no blocks this code can checkpoint")
    return switched


class ActivationCheckpointing(L.Callback):
    """Switches checkpointing on in the module's trained network (`trained_network()`) before training."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            checkpoint_activations(pl_module.trained_network())


# The estimate before the first step (`dry_run`): a forward and backward pass of the trained network on the meta
# device (shapes only, no memory), with the tensors autograd saves for the backward pass counted.

BYTES_PER_TRAINED_PARAMETER = {"weights": 4, "gradients": 4, "optimizer": 8}  # fp32 weights, grads, AdamW's 2 moments
LOWER_PRECISION = (  # ops autocast runs in bf16/fp16 (torch's CUDA autocast lists)
    torch.nn.functional.linear,
    torch.conv1d,
    torch.conv2d,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.baddbmm,
    torch.addmm,
    torch.mm,
    torch.nn.functional.scaled_dot_product_attention,
)
FULL_PRECISION = (  # ops autocast runs in fp32
    torch.nn.functional.layer_norm,
    torch.nn.functional.group_norm,
    torch.nn.functional.softmax,
    torch.softmax,
    torch.Tensor.softmax,
    torch.nn.functional.log_softmax,
)


class _FusedAttention(torch.autograd.Function):
    """Attention as the fused kernels keep it for the backward pass (q, k, v, the output and a row-wise log-sum-exp,
    never the L × S weights the unfused formula on the meta device would save)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class TrainingOnMeta(torch.overrides.TorchFunctionMode):
    """A training forward pass on meta tensors as a GPU runs it: attention fused (_FusedAttention) and, under mixed
    precision (`dtype`), what autocast does, which leaves meta tensors alone: float inputs of LOWER_PRECISION ops
    cast to `dtype` and, with `full` (CUDA's lists), of FULL_PRECISION ops to fp32. Autograd then saves what it
    would save on the device."""

    def __init__(self, dtype: torch.dtype | None, full: bool = True):
        super().__init__()
        self.dtype, self.full = dtype, full

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = None
        if self.dtype is not None:
            target = self.dtype if func in LOWER_PRECISION else torch.float32 if func in FULL_PRECISION else None
            target = None if target is torch.float32 and not self.full else target
        if target is not None:

            def cast(x):
                return x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

            args, kwargs = torch.utils._pytree.tree_map(cast, (args, kwargs))
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _FusedAttention.apply(*args[:3])
        return func(*args, **kwargs)


def _activation_bytes(net: torch.nn.Module, inputs: tuple, precision: str, device_type: str) -> int:
    """Bytes of the tensors autograd saves in a forward pass for the backward pass, less the parameters."""
    from torch.multiprocessing.reductions import StorageWeakRef

    weights = {StorageWeakRef(p.untyped_storage()).cdata for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in weights:
            saved[key] = t.untyped_storage().nbytes()
        return t

    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    with TrainingOnMeta(half, full=device_type == "cuda"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(*inputs)
    return sum(saved.values())


def _flops(net: torch.nn.Module, inputs: tuple) -> int:
    """FLOPs of a forward and backward pass (torch.utils.flop_counter's count: matrix products and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as flops:
        outputs = net(*inputs)
        outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        sum(o.float().pow(2).mean() for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad).backward()
    return flops.get_total_flops()


def estimate(
    build,
    batch: int,
    precision: str,
    checkpointing: bool = False,
    inputs=None,
    device_type: str = "cuda",
    ema: bool = True,
    shards: int = 1,
) -> dict:
    """Memory per device (GB) and FLOPs per sample of training the network `build()` makes, at `batch` rows per
    device and `precision` ('32-true', 'bf16-mixed', '16-mixed'), built on the meta device (no memory, no data):
    fp32 weights, gradients and AdamW's two moments per trained parameter, the EMA copy (all parameters; `ema`), and
    the activations autograd saves for the backward pass (counted on `inputs(net, batch)`, default the network's
    `example_inputs(batch)`; with `checkpointing`, as checkpointing keeps them; mixed precision as autocast on
    `device_type` casts, TrainingOnMeta). FLOPs: forward and backward of one sample, counted by
    torch.utils.flop_counter (without checkpointing's recomputation). `shards`: the ranks fsdp2 divides the
    weights, gradients, optimizer state and EMA over (the whole layer being gathered is not counted)."""
    with torch.device("meta"):
        net = build()
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    everything = sum(p.numel() for p in net.parameters())
    make_inputs = inputs or (lambda n, b: n.example_inputs(b))
    flops = _flops(net, make_inputs(net, batch))
    if checkpointing:
        checkpoint_activations(net)
    activations = _activation_bytes(net, make_inputs(net, batch), precision, device_type)
    gb = 2.0**-30
    parts = {name: trained * size * gb / shards for name, size in BYTES_PER_TRAINED_PARAMETER.items()}
    parts["ema"] = everything * 4 * gb / shards if ema else 0.0  # the diffusion trainers keep an EMA copy, CLIP's not
    parts["activations"] = activations * gb
    return {
        "parameters": everything,
        "trained_parameters": trained,
        "batch_per_device": batch,
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "sharded_over": shards,
        "autocast_as_on": device_type if precision.endswith("mixed") else None,
        "memory_gb": {**{k: round(v, 4) for k, v in parts.items()}, "total": round(sum(parts.values()), 4)},
        "flops_per_sample": flops / batch,
    }


def report(figures: dict) -> str:
    """The estimate as a few printed lines."""
    m = figures["memory_gb"]
    sharded = f", sharded over {figures['sharded_over']} ranks" if figures["sharded_over"] > 1 else ""
    return (
        f"estimate per device: {figures['parameters'] / 1e6:.1f} M parameters "
        f"({figures['trained_parameters'] / 1e6:.1f} M trained), batch {figures['batch_per_device']}, "
        f"{figures['precision']}{', gradient checkpointing' if figures['gradient_checkpointing'] else ''}{sharded}\n"
        f"  memory {m['total']:.2f} GB = weights {m['weights']:.2f} + gradients {m['gradients']:.2f} + AdamW "
        f"{m['optimizer']:.2f} + EMA {m['ema']:.2f} + activations {m['activations']:.2f}\n"
        f"  {figures['flops_per_sample'] / 1e9:.3g} GFLOP per sample (forward and backward)"
    )


class PeakMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the tensor storages that are alive while it is on, and their peak: every storage an
    op creates is counted until the last tensor on it is gone (what tracemalloc cannot see)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple] = {}  # storage → (weak reference, bytes)
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.now += self.live[ref.cdata][1]
        self.peak = max(self.peak, self.now)
        return out


def dry_run_sizes(kind: str, sizes: dict, text_tokens: str, defaults: dict) -> dict:
    """A network's sizes from its config alone (a dry run reads no data and loads no CLIP): `dim` as the config
    sets it, else the size class's default (said aloud); per-token encodings as wide as `dim` where the network
    reads them (as the exportable layouts require) and the config sets no width."""
    sizes = dict(sizes)
    if "dim" in defaults and "dim" not in sizes:
        sizes["dim"] = defaults["dim"]
        print(f"dry run: {kind}.dim is not in the config (the data's CLIP sets it): estimating at {sizes['dim']}")
    if text_tokens == "clip" and "text_token_width" in defaults and not sizes.get("text_token_width"):
        sizes["text_token_width"] = sizes["dim"]
    return sizes


def planned_shards(trainer: dict) -> int:
    """The ranks `strategy: fsdp2` shards the model state over (1 for any other strategy)."""
    if trainer.get("strategy") != "fsdp2" or not isinstance(trainer["devices"], int):  # train-clip has none
        return 1
    return max(1, trainer["devices"] * trainer["num_nodes"])


def planned_numerics(trainer: dict, dry_run: bool) -> tuple[str, str]:
    """(precision, autocast device) an estimate assumes for a job's trainer settings: on the machine it runs
    on, except that a dry run sizes a GPU run unless the config names the CPU (so `precision: auto` is bf16 on
    a laptop too, and norms run in fp32 as CUDA's autocast keeps them)."""
    from training.trainer import on_gpu, resolve_precision

    accelerator = "gpu" if dry_run and trainer["accelerator"] != "cpu" else trainer["accelerator"]
    return resolve_precision(trainer["precision"], accelerator), "cuda" if on_gpu(accelerator) else "cpu"


def job_estimate(build, parts: dict, dry_run: bool = False, inputs=None, ema: bool = True) -> dict:
    """`estimate` with a training job's settings (`parts`, JobSpec.split's): its batch, checkpointing, the
    precision and autocast device it plans (`planned_numerics`) and the ranks fsdp2 shards over."""
    trainer = parts["trainer"]
    precision, device_type = planned_numerics(trainer, dry_run)
    return estimate(
        build,
        parts["data"]["batch_size"],
        precision,
        trainer["gradient_checkpointing"],
        inputs,
        device_type=device_type,
        ema=ema,
        shards=planned_shards(trainer),
    )


def announce(run_dir: Path, figures: dict) -> dict:
    """Print the estimate and write it to run_dir/estimate.json; returns it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "estimate.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(report(figures) + f"\n  written to {run_dir / 'estimate.json'}")
    return figures


# Sharded training (`strategy: fsdp2`): FSDP2's fully_shard through Lightning's ModelParallelStrategy, which also
# runs on CPUs over gloo.


def shard_units(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks sharded as units of their own (gathered one at a time in forward and backward): a
    PriorTransformer's transformer blocks, a UNet's down, mid and up blocks."""
    from diffusers import PriorTransformer

    units = []
    for part in net.modules():
        if isinstance(part, PriorTransformer):
            units += list(part.transformer_blocks)
        elif hasattr(part, "down_blocks") and hasattr(part, "up_blocks"):
            units += [*part.down_blocks, *([part.mid_block] if part.mid_block is not None else []), *part.up_blocks]
    return units


def shard(net: torch.nn.Module, mesh, whole: set[str], trained: bool = True) -> None:
    """fully_shard `net` over `mesh`, block by block (`shard_units`) then the rest; the parameters named in
    `whole` (frozen ones that code outside forward reads, such as a prior's clip statistics) stay whole tensors
    on every rank. A network that is not `trained` (the EMA copy, forward only) is resharded after every forward,
    its outermost parameters too (which FSDP2 would keep gathered for a backward pass that never comes)."""
    from torch.distributed.fsdp import fully_shard

    ignored = {p for name, p in net.named_parameters() if name in whole}
    after_forward = None if trained else True
    for unit in shard_units(net):
        fully_shard(
            unit, mesh=mesh, ignored_params=ignored & set(unit.parameters()), reshard_after_forward=after_forward
        )
    fully_shard(net, mesh=mesh, ignored_params=ignored, reshard_after_forward=after_forward)
