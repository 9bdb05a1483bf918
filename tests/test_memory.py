"""Memory before the first step (training/memory.py): the estimate against the measured peak, checkpointing that
changes memory and not results, and the dry run from a config alone."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import open_clip
import pytest
import torch

from embeddings.config import parse_yaml
from training.decoder_net import DecoderConfig, Upsampler, UpsamplerConfig, build_decoder
from training.memory import PeakMemory, checkpoint_activations, estimate
from training.prior_net import DiffusionPrior, PriorConfig

from .conftest import REPO


def _sizes(config: str, section: str, **extra) -> dict:
    return dict(parse_yaml((REPO / "configs" / config).read_text())[section], **extra)


NETS = {  # the tiny configs' networks, as the tiny data set (32-d CLIP, 16 tokens) sizes them
    "prior": (lambda: DiffusionPrior(PriorConfig(**_sizes("prior/tiny.yaml", "prior", dim=32))), 16),
    "prior with tokens": (
        lambda: DiffusionPrior(
            PriorConfig(**_sizes("prior/tiny.yaml", "prior", dim=32, text_token_width=32, max_text_tokens=16))
        ),
        16,
    ),
    "decoder": (lambda: build_decoder(DecoderConfig(**_sizes("decoder/tiny.yaml", "decoder", dim=32))), 8),
    "karlo decoder": (
        lambda: build_decoder(
            DecoderConfig(**_sizes("decoder/tiny.yaml", "decoder", dim=32, text_token_width=32, layout="karlo"))
        ),
        8,
    ),
    "upsampler": (lambda: Upsampler(UpsamplerConfig(**_sizes("decoder/upsampler-tiny.yaml", "upsampler"))), 8),
    "clip": (lambda: ExampleClip(**_sizes("clip/tiny.yaml", "model")), 16),
}


class ExampleClip(open_clip.model.CLIP):
    """open_clip's CLIP with train-clip's estimate inputs (training/clip.py:clip_example_inputs)."""

    def __init__(self, **model):
        super().__init__(**model)
        self.model = model

    def example_inputs(self, batch: int) -> tuple:
        from training.clip import clip_example_inputs

        return clip_example_inputs(self.model, batch, self.logit_scale.device)


def _step(net: torch.nn.Module, inputs: tuple, precision: str) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        out = net(*inputs)
    outputs = out if isinstance(out, tuple) else (out,)
    loss = sum(o.float().pow(2).mean() for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad)
    loss.backward()
    return loss


def measured_peak(build, batch: int, precision: str, checkpointing: bool = False) -> int:
    """Peak bytes of live tensors over two training steps (AdamW, an EMA copy), everything built inside."""
    torch.manual_seed(0)
    with PeakMemory() as memory:
        net = build()
        ema = copy.deepcopy(net)
        if checkpointing:
            checkpoint_activations(net)
        optimizer = torch.optim.AdamW(net.parameters())
        ema = ema if not isinstance(net, open_clip.model.CLIP) else None  # train-clip keeps none
        inputs = net.example_inputs(batch)
        for _ in range(2):
            _step(net, inputs, precision)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for e, p in zip(ema.parameters() if ema else [], net.parameters()):
                    e.lerp_(p, 0.01)
    return memory.peak


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", list(NETS))
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(name, precision):
    build, batch = NETS[name]
    figures = estimate(build, batch, precision, device_type="cpu", ema=name != "clip")
    peak_gb = measured_peak(build, batch, precision) / 2**30
    assert 0.75 <= figures["memory_gb"]["total"] / peak_gb <= 1.25, (figures["memory_gb"], peak_gb)
    real = build()
    assert figures["parameters"] == sum(p.numel() for p in real.parameters())
    assert figures["trained_parameters"] == sum(p.numel() for p in real.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["prior with tokens", "karlo decoder", "upsampler"])
def test_checkpointing_changes_memory_not_results(name):
    build, batch = NETS[name]
    torch.manual_seed(0)
    plain = build()
    switched = copy.deepcopy(plain)
    assert checkpoint_activations(switched) >= 1
    assert switched.state_dict().keys() == plain.state_dict().keys()
    inputs = plain.example_inputs(batch)
    losses = [_step(net, inputs, "32-true") for net in (plain, switched)]
    assert torch.equal(losses[0], losses[1])
    for (key, a), b in zip(plain.named_parameters(), switched.parameters()):
        assert (a.grad is None) == (b.grad is None), key
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=key)
    assert measured_peak(build, batch, "32-true", checkpointing=True) < measured_peak(build, batch, "32-true")
    with_checkpoints = estimate(build, batch, "32-true", checkpointing=True, device_type="cpu")["memory_gb"]
    assert (
        with_checkpoints["activations"]
        < estimate(build, batch, "32-true", device_type="cpu")["memory_gb"]["activations"]
    )


def test_a_net_without_blocks_to_checkpoint_is_refused():
    with pytest.raises(ValueError, match="Linear has no blocks"):
        checkpoint_activations(torch.nn.Linear(2, 2))


def test_a_dry_run_sizes_a_full_size_prior_from_its_config_alone(tmp_path, capsys):
    """The published LAION prior's config on a machine without its data: the estimate is printed and written, its
    parameters are those of the network the job would train, and nothing of the data set is read."""
    from training.prior_job import load_prior_config, train_prior

    settings = load_prior_config(
        REPO / "configs/prior/laion-vit-l14.yaml", ["dry_run=true", f"outputs_root={tmp_path}"]
    )
    figures = train_prior(**settings)
    written = json.loads((tmp_path / "train-prior-cc3m" / "estimate.json").read_text())
    assert written == json.loads(json.dumps(figures))
    sizes = _sizes("prior/laion-vit-l14.yaml", "prior")
    with torch.device("meta"):
        net = DiffusionPrior(PriorConfig(**sizes))
    assert figures["parameters"] == sum(p.numel() for p in net.parameters())
    assert figures["batch_per_device"] == 512 and figures["precision"] == "bf16-mixed"
    # forward and backward ≈ 6 FLOPs per weight and token (2 forward, 4 backward) over its 77 + 4 tokens
    assert figures["flops_per_sample"] == pytest.approx(6 * figures["trained_parameters"] * 81, rel=0.1)
    assert "estimate per device: 88.7 M parameters" in capsys.readouterr().out


def test_a_dry_run_of_the_decoder_follows_batch_and_checkpointing(tmp_path):
    from training.decoder_job import load_decoder_config, train_decoder

    def dry(*overrides):
        settings = load_decoder_config(
            REPO / "configs/decoder/laion-64px.yaml", ["dry_run=true", f"outputs_root={tmp_path}", *overrides]
        )
        return train_decoder(**settings)

    half, whole, checkpointed = dry(), dry("batch_size=128"), dry("gradient_checkpointing=true")
    assert half["batch_per_device"] == 64 and half["memory_gb"]["total"] < 80  # the config fits an 80 GB GPU
    assert whole["parameters"] == half["parameters"] == checkpointed["parameters"]
    assert half["memory_gb"]["activations"] == pytest.approx(whole["memory_gb"]["activations"] / 2, rel=0.03)
    assert checkpointed["memory_gb"]["activations"] < 0.8 * half["memory_gb"]["activations"]  # both at batch 64
    assert whole["flops_per_sample"] == pytest.approx(half["flops_per_sample"])
    assert (tmp_path / "train-decoder-cc3m" / "estimate.json").is_file()
    sharded = dry("strategy=fsdp2", "devices=8")  # the model state divided over 8 ranks, the activations not
    assert sharded["sharded_over"] == 8
    assert sharded["memory_gb"]["optimizer"] == pytest.approx(half["memory_gb"]["optimizer"] / 8, rel=1e-3)
    assert sharded["memory_gb"]["activations"] == half["memory_gb"]["activations"]


def test_the_gpu_checks_script_runs_every_check_on_its_cpu_path(tmp_path):
    """bench/gpu_checks.py --smoke: the embed path (both decoders) and the three networks' training checks, with
    and without checkpointing, at toy sizes on the CPU; every check reports, none fails."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_checks.py"), str(tmp_path), "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_checks.json").read_text())
    names = ["prior", "decoder", "upsampler"]
    assert set(report) >= {"embed", *names, *(f"{n}_checkpointed" for n in names)}
    assert not [name for name, figures in report.items() if isinstance(figures, dict) and "error" in figures]
    assert report["embed"]["embed_path_torchvision_decode_samples_per_s"] > 0 and report["embed"]["job_over_towers"] > 0
    odd = report["embed"]["odd_jpegs"]  # greyscale, CMYK, progressive, plain and a truncated JPEG
    assert odd["embedded_by"]["torchvision"] == odd["embedded_by"]["pil"] == ["cmyk", "grey", "plain", "progressive"]
    assert odd["skipped"]["torchvision"] == odd["skipped"]["pil"] and odd["min_cosine_torchvision_vs_pil"] > 0.99
    for name in names:
        assert report[name]["samples_per_s"] > 0 and 0 < report[name]["model_flop_utilisation"] < 1
