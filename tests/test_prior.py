"""train-prior: learns, resumes mid-epoch onto the same batch and loss, splits data over DDP ranks, stops on NaN."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch

from embeddings import store
from training.prior import PriorDataModule, PriorModule, evaluate_prior
from training.export import load_prior
from training.generate import sample_prior
from training.prior_job import load_prior_config, train_prior

from .conftest import REPO, opt_out_view


class RecordBatches(L.Callback):
    """Keeps the keys of every training batch and the loss of every step; can stop the run at a step."""

    def __init__(self, stop_at: int | None = None):
        self.keys, self.losses, self.stop_at = [], [], stop_at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.keys.append(list(batch["key"]))
        self.losses.append(float(outputs["loss"]))
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True  # an interruption: the same schedule, cut short


@pytest.fixture(scope="module")
def prior_settings(tiny_embed, tmp_path_factory):
    config, _ = tiny_embed
    root = tmp_path_factory.mktemp("prior")
    settings = load_prior_config(REPO / "configs/prior/tiny.yaml")
    return dict(settings, data_root=config.data_root, models_root=str(root / "models"), precision="32"), root


def _run(settings, root, run, stop_at=None, extra=(), **overrides):
    callback = RecordBatches(stop_at)
    import training.prior_job as job

    original = job.build_trainer
    job.build_trainer = lambda *a, **k: original(*a, **dict(k, callbacks=[callback, *extra]))
    try:
        metrics = train_prior(**dict(settings, outputs_root=str(root / run), **overrides))
    finally:
        job.build_trainer = original
    return metrics, callback


def test_tiny_prior_loss_falls_and_exports(prior_settings):
    settings, root = prior_settings
    metrics, record = _run(settings, root, "full", max_steps=40, val_every=1000)
    assert np.mean(record.losses[-5:]) < np.mean(record.losses[:5])
    assert metrics["step"] == 40 and {"cosine_predicted", "cosine_text", "r_at_1_predicted", "r_at_10_text"} <= set(
        metrics
    )
    config = json.loads((root / "models" / "tiny" / "prior" / "config.json").read_text())
    assert config["clip"]["checksum"] and config["prior"]["dim"] == 32


def test_resume_mid_epoch_sees_the_same_next_batch_and_loss(prior_settings):
    settings, root = prior_settings
    _, whole = _run(settings, root, "whole", max_steps=12, val_every=1000, resume=None)
    _, first = _run(settings, root, "split", max_steps=12, val_every=1000, checkpoint_every=7, resume=None, stop_at=7)
    checkpoint = root / "split" / "train-prior-tiny" / "checkpoints" / "step000007.ckpt"
    position = torch.load(checkpoint, weights_only=True)["data_position"]
    assert 0 < position["batches"] < 12 - 7 + position["batches"]  # mid-epoch
    _, second = _run(settings, root, "split", max_steps=12, val_every=1000, resume=str(checkpoint))
    assert first.keys + second.keys == whole.keys
    assert second.keys[0] == whole.keys[7]
    assert second.losses[-1] == pytest.approx(whole.losses[-1], rel=1e-5)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(prior_settings, monkeypatch):
    settings, root = prior_settings
    original = PriorModule.forward_loss

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if self.global_step >= 4 else loss

    monkeypatch.setattr(PriorModule, "forward_loss", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4: training stopped"):
        _run(settings, root, "nan", max_steps=12, checkpoint_every=3, val_every=1000, resume=None)
    checkpoints = root / "nan" / "train-prior-tiny" / "checkpoints"
    state = torch.load(checkpoints / "step000003.ckpt", weights_only=True)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_sampling_is_deterministic_and_checks_the_clip(prior_settings, tiny_embed):
    settings, root = prior_settings
    config, manifest = tiny_embed
    prior_dir = root / "models" / "tiny" / "prior"
    prompts = ["a large red circle in the center on a black background", "a small blue square at the top left on white"]
    a = sample_prior(prompts, prior_dir, config.layout.embeddings, seed=3, steps=8)
    b = sample_prior(prompts[:1], prior_dir, config.layout.embeddings, seed=3, steps=8)
    assert a.shape == (2, 32) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.allclose(a[0], b[0], atol=1e-6)  # per-sample seeds: batch size does not matter
    from embeddings.config import ConfigError

    with pytest.raises(ConfigError, match="trained against another CLIP"):
        load_prior(prior_dir, clip_checksum="0" * 64)


def test_evaluate_prior_ranks():
    rng = np.random.default_rng(0)
    z_i = rng.normal(size=(50, 8))
    z_i /= np.linalg.norm(z_i, axis=1, keepdims=True)
    metrics = evaluate_prior(z_i.copy(), z_i, np.roll(z_i, 1, axis=0))
    assert metrics["r_at_1_predicted"] == 1.0 and metrics["cosine_predicted"] == pytest.approx(1.0)
    assert metrics["r_at_1_text"] == 0.0
    # the predicted embedding's cosine to another pair's image: z_i against its neighbour in the list
    assert metrics["cosine_unrelated"] == pytest.approx(float((z_i * np.roll(z_i, 1, axis=0)).sum(1).mean()))


def test_a_wall_clock_budget_stops_training_first_and_says_so(prior_settings):
    settings, root = prior_settings
    metrics, record = _run(settings, root, "budget", max_steps=100_000, max_time="00:00:00:02", val_every=1000)
    assert metrics["stopped_by"] == "max_time" and 0 < metrics["step"] == len(record.losses) < 100_000
    metrics, _ = _run(settings, root, "steps", max_steps=3, max_time=600, val_every=1000)
    assert metrics == dict(metrics, step=3, stopped_by="max_steps")


def test_max_time_takes_clock_strings_or_seconds():
    from embeddings.config import ConfigError, parse_overrides
    from training.trainer import parse_max_time

    assert parse_max_time("00:07:00").total_seconds() == 420 and parse_max_time(90).total_seconds() == 90
    assert parse_max_time("01:00:00:00").days == 1 and parse_max_time(None) is None
    # YAML 1.1 reads an unpadded clock as base 60: 1:30:00 is 5400, which as seconds is still 1 h 30 min
    (value,) = parse_overrides(["max_time=1:30:00"]).values()
    assert parse_max_time(value).total_seconds() == 5400
    for bad in ("5", "00:61", 0, "a:b:c", -1, True):
        with pytest.raises(ConfigError, match="max_time"):
            parse_max_time(bad)


def test_precision_is_checked_when_the_config_loads():
    from embeddings.config import ConfigError

    for good in ("auto", "bf16-mixed", "16-mixed", "32"):
        assert str(load_prior_config(REPO / "configs/prior/tiny.yaml", [f"precision={good}"])["precision"]) == good
    with pytest.raises(ConfigError, match=r"tiny.yaml: precision 'fp16': use one of auto, bf16-mixed, 16-mixed, 32"):
        load_prior_config(REPO / "configs/prior/tiny.yaml", ["precision=fp16"])


class Overflow(L.Callback):
    """Sets one gradient to inf at step `at` (before the optimizer step); records the loss scale and whether the
    weights moved at every step."""

    def __init__(self, at: int):
        self.at, self.scales, self.moved, self.before = at, [], [], None

    def on_after_backward(self, trainer, module):
        self.before = [p.detach().clone() for p in module.net.parameters()]
        if trainer.global_step == self.at:
            next(p for p in module.net.parameters() if p.grad is not None).grad.fill_(float("inf"))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())
        self.moved.append(any(not torch.equal(a, b) for a, b in zip(self.before, module.net.parameters())))


def test_fp16_trains_under_a_dynamic_loss_scale_that_skips_an_overflowing_step(prior_settings):
    """precision 16-mixed: fp16 autocast with torch.amp.GradScaler, on the CPU too (Lightning alone would train
    bf16 there). A step whose gradients overflow leaves the weights as they were and halves the scale; the others
    train, and the gradients' norm is logged."""
    settings, root = prior_settings
    overflow = Overflow(at=3)
    import training.prior_job as job

    original = job.build_trainer
    job.build_trainer = lambda *a, **k: original(*a, **dict(k, callbacks=[overflow]))
    try:
        metrics = train_prior(
            **dict(settings, outputs_root=str(root / "fp16"), precision="16-mixed", max_steps=6, val_every=1000)
        )
    finally:
        job.build_trainer = original
    scales = overflow.scales
    assert scales[0] == 2.0**16 and scales[3] == scales[2] / 2 and scales[4] == scales[3]
    assert overflow.moved == [True, True, True, False, True, True]
    assert metrics["step"] == 6  # Lightning counts the skipped step as taken
    log = (root / "fp16" / "train-prior-tiny" / "logs" / "metrics.csv").read_text().splitlines()
    norms = [row.split(",")[log[0].split(",").index("train/grad_norm")] for row in log[1:]]
    values = [float(v) for v in norms if v]
    assert len(values) == 6 and np.isinf(values[3]) and all(0 < v < np.inf for v in values[:3] + values[4:])


class Draws(L.Callback):
    """Per training batch: its place in the accumulation and the first number its step generator draws; whether
    the prior's transformer blocks are wrapped for checkpointing (at the first batch)."""

    def __init__(self):
        self.micro, self.first_draw, self.wrapped = [], [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.micro.append(module.micro_batch())
        self.first_draw.append(float(torch.rand(1, generator=module.step_generator())))
        if self.wrapped is None:
            blocks = module.net.transformer.transformer_blocks
            self.wrapped = [isinstance(block.forward, functools.partial) for block in blocks]


def test_accumulated_gradients_resume_exactly_and_step_the_ema_per_optimizer_step(prior_settings, monkeypatch):
    """accumulate_grad_batches 2: the EMA moves once per optimizer step; the two batches of a step draw from
    streams of their own; a run stopped at step 3 and resumed sees the batches and losses of an uninterrupted
    one."""
    import training.trainer as trainer_module

    settings, root = prior_settings
    ema_steps = []
    original_ema = trainer_module.ema_update

    def counted(ema, net, step, decay):
        ema_steps.append(step)
        original_ema(ema, net, step, decay)

    monkeypatch.setattr(trainer_module, "ema_update", counted)
    draws = Draws()
    common = dict(max_steps=6, val_every=1000, accumulate_grad_batches=2, resume=None)
    _, whole = _run(settings, root, "accumulate-whole", **common, extra=[draws])
    assert len(whole.keys) == 12 and ema_steps == [1, 2, 3, 4, 5, 6]
    assert draws.micro == [0, 1] * 6 and len(set(draws.first_draw)) == 12
    _, first = _run(settings, root, "accumulate-split", **dict(common, checkpoint_every=3), stop_at=3)
    checkpoint = root / "accumulate-split" / "train-prior-tiny" / "checkpoints" / "step000003.ckpt"
    assert torch.load(checkpoint, weights_only=True)["data_position"]["batches"] % 2 == 0
    _, second = _run(settings, root, "accumulate-split", **dict(common, resume=str(checkpoint)))
    assert first.keys + second.keys == whole.keys
    assert second.losses == pytest.approx(whole.losses[len(first.losses) :], rel=1e-5)


def test_a_wall_clock_stop_waits_for_the_step_to_complete(prior_settings, tiny_embed):
    """max_time runs out after some batch: with 5 batches a step, training stops after a step's last batch (or
    the epoch's), so the checkpoint it leaves holds no half-accumulated step."""
    settings, root = prior_settings
    metrics, record = _run(
        settings, root, "accumulate-budget", max_steps=100_000, max_time=3, val_every=1000, accumulate_grad_batches=5
    )
    assert metrics["stopped_by"] == "max_time"
    data = PriorDataModule(str(tiny_embed[0].layout.embeddings), seed=0, batch_size=settings["batch_size"])
    per_epoch = data.train_stream(0).batches_per_epoch()  # Lightning steps at an epoch's end too
    epochs, within = divmod(len(record.keys), per_epoch)
    assert per_epoch % 5 and within % 5 == 0
    assert metrics["step"] == epochs * -(-per_epoch // 5) + within // 5


def test_gradient_checkpointing_trains_the_same_prior(prior_settings):
    settings, root = prior_settings
    _, plain = _run(settings, root, "plain", max_steps=4, val_every=1000, resume=None)
    draws = Draws()
    _, switched = _run(
        settings,
        root,
        "checkpointed",
        max_steps=4,
        val_every=1000,
        resume=None,
        gradient_checkpointing=True,
        extra=[draws],
    )
    assert draws.wrapped == [True, True]  # both blocks of the tiny prior
    assert switched.keys == plain.keys and switched.losses == pytest.approx(plain.losses, rel=1e-5)


def test_distinct_rank_ignores_images_of_the_same_scene():
    """Two renders of one scene: the query's own image ranks second overall but first among other scenes."""
    z_i = np.eye(4)[[0, 0, 1, 2]] * 0.9 + np.eye(4)[[3, 1, 3, 3]] * np.sqrt(1 - 0.81)
    query = z_i[[1, 1, 2, 3]]  # pair 0 is searched with the embedding of its twin, pair 1
    metrics = evaluate_prior(query, z_i, query, scenes=["a", "a", "b", "c"])
    assert metrics["r_at_1_predicted"] == 0.75 and metrics["r_at_1_distinct_predicted"] == 1.0


def two_process_run(embeddings, out, launcher: str) -> list[dict]:
    """tests/ddp_prior_run.py in a subprocess with `launcher`; what each of the two ranks saw (its `val` figures too)."""
    script = REPO / "tests" / "ddp_prior_run.py"
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [
        *(runner if launcher == "torchrun" else [sys.executable]),
        str(script),
        str(embeddings),
        str(out),
        launcher,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    read = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None
    return [dict(read(f"rank{r}.json"), val=read(f"val{r}.json"), sharded=read(f"sharded{r}.json")) for r in (0, 1)]


@pytest.fixture(scope="module")
def lightning_ddp(tiny_embed, tmp_path_factory):
    return two_process_run(tiny_embed[0].layout.embeddings, tmp_path_factory.mktemp("ddp"), "lightning")


def test_two_process_ddp_sees_disjoint_samples_and_equal_batches(lightning_ddp):
    ranks = lightning_ddp
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) > 0
    seen = [set(k for batch in r["batches"][: r["batches_per_epoch"]] for k in batch) for r in ranks]
    assert not seen[0] & seen[1]
    assert ranks[0]["shards"] % 2 == 1 and len(set(ranks[0]["shard_sizes"])) > 1  # odd count, uneven sizes


@pytest.mark.parametrize("launcher", ["ray", "torchrun"])
def test_ray_train_and_torchrun_match_lightning_ddp(launcher, lightning_ddp, tiny_embed, tmp_path):
    """launcher: ray (Ray Train, two CPU workers) and torchrun: the same batches, losses and weights as Lightning's DDP."""
    ranks = two_process_run(tiny_embed[0].layout.embeddings, tmp_path, launcher)
    for ray_rank, ddp_rank in zip(ranks, lightning_ddp):
        assert ray_rank["batches"] == ddp_rank["batches"]
        np.testing.assert_allclose(ray_rank["losses"], ddp_rank["losses"], rtol=1e-5)
        assert ray_rank["weights"] == pytest.approx(ddp_rank["weights"], rel=1e-6)


def test_sharded_fsdp2_on_two_cpu_processes_trains_as_ddp_and_resumes(lightning_ddp, tiny_embed, tmp_path):
    """strategy fsdp2 (FSDP2's fully_shard over gloo, Lightning's ModelParallelStrategy): the same batches, losses,
    final weights and EMA as DDP (fp32); the EMA gathered whole on rank 0 is DDP's; a run stopped at step 3
    resumes from its (whole, rank-0) checkpoint onto the losses of the uninterrupted run."""
    ranks = two_process_run(tiny_embed[0].layout.embeddings, tmp_path, "fsdp2")
    trained = 2 * sum(1 for _ in PriorModule({"dim": 32, "width": 32, "depth": 1, "heads": 2}).net.parameters())
    assert ranks[0]["sharded_tensors"] == trained - 2 * 2  # all but clip_mean, clip_std (whole), in net and EMA
    assert lightning_ddp[0]["sharded_tensors"] == 0
    for sharded, ddp in zip(ranks, lightning_ddp):
        assert sharded["batches"] == ddp["batches"]
        np.testing.assert_allclose(sharded["losses"], ddp["losses"], rtol=1e-5)
        assert sharded["weights"] == pytest.approx(ddp["weights"], rel=1e-5)
        assert sharded["ema"] == pytest.approx(ddp["ema"], rel=1e-5)
    assert ranks[0]["sharded"]["ema"] == pytest.approx(lightning_ddp[0]["ema"], rel=1e-5)
    np.testing.assert_allclose(ranks[0]["sharded"]["resumed_losses"], ranks[0]["losses"], rtol=1e-5)


def test_tiny_prior_trains_with_clip_text_tokens(prior_settings, tiny_embed):
    """text_tokens: clip (the full-size prior's setting) on the CPU: per-token encodings from the frozen CLIP,
    the width and token count taken from it, a few steps, an export that samples."""
    settings, root = prior_settings
    config, _ = tiny_embed
    metrics, record = _run(settings, root, "tokens", text_tokens="clip", max_steps=3, val_every=1000, resume=None)
    assert len(record.losses) == 3 and all(np.isfinite(record.losses)) and metrics["step"] == 3
    exported = json.loads((root / "models" / "tiny" / "prior" / "config.json").read_text())
    assert (exported["prior"]["text_token_width"], exported["prior"]["max_text_tokens"]) == (32, 32)
    z = sample_prior(["a red circle"], root / "models" / "tiny" / "prior", config.layout.embeddings, steps=4)
    assert z.shape == (1, 32)


def test_fine_tuning_a_published_prior_moves_the_loss_and_round_trips_to_diffusers(prior_settings, tiny_embed):
    """init_from a tiny Karlo-layout prior (statistics of the tiny data's raw image embeddings): 20 steps on the
    tiny embeddings in raw CLIP space lower the loss; the export samples unit vectors, writes back to a
    diffusers folder that diffusers loads with the same outputs, and init_from reads that folder exactly."""
    from diffusers import PriorTransformer

    from embeddings import store
    from training.data import embedding_shards
    from training.prior_net import DiffusionPrior, PriorConfig
    from training.published import load_published_prior, save_prior_diffusers

    settings, root = prior_settings
    config, _ = tiny_embed
    shard = embedding_shards(config.layout.embeddings, "train")[0]
    raw = store.raw_vectors(store.read_shard(shard.path), "image_embedding")
    torch.manual_seed(0)
    published = PriorTransformer(
        num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=32, num_embeddings=32
    )
    with torch.no_grad():
        published.clip_mean.copy_(torch.from_numpy(raw.mean(0, keepdims=True)))
        published.clip_std.copy_(torch.from_numpy(raw.std(0, keepdims=True)))
    published.save_pretrained(root / "published")
    overrides = dict(init_from=str(root / "published"), prior=None, text_tokens="clip", name="finetuned")
    metrics, record = _run(settings, root, "finetune", max_steps=20, val_every=1000, resume=None, **overrides)
    assert np.mean(record.losses[-5:]) < np.mean(record.losses[:5]) and metrics["step"] == 20

    folder = root / "models" / "finetuned" / "prior"
    assert json.loads((folder / "config.json").read_text())["prior"]["clip_space"] == "raw"
    sampler = load_prior(folder)
    moved = [
        k for k, v in published.state_dict().items() if not torch.equal(v, sampler.net.transformer.state_dict()[k])
    ]
    assert moved and "clip_mean" not in moved and "clip_std" not in moved  # trained weights, fixed statistics
    z = sample_prior(["a red circle"], folder, config.layout.embeddings, steps=4)
    assert z.shape == (1, 32) and np.isclose(np.linalg.norm(z), 1.0, atol=1e-4)

    save_prior_diffusers(sampler.net, root / "exported")
    again = PriorTransformer.from_pretrained(root / "exported").eval()
    x_t, z_t, tokens = torch.randn(2, 32), torch.randn(2, 32), torch.randn(2, 32, 32)
    mask, t = torch.arange(32)[None] < torch.tensor([[7], [32]]), torch.tensor([3, 700])
    with torch.no_grad():
        ours = sampler.net(x_t, t, z_t, tokens, mask)
        theirs = again(x_t, t, z_t, encoder_hidden_states=tokens, attention_mask=mask).predicted_image_embedding
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    reloaded = DiffusionPrior(PriorConfig(**sampler.config.to_dict()))
    load_published_prior(reloaded, root / "exported")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in sampler.net.state_dict().items())


def test_two_processes_validate_on_every_pair_as_one_process_does(lightning_ddp):
    """Validation under DDP: each rank samples its share of the val pairs (seeded by the pair's index among
    all of them), the figures combine every rank's pairs once, and equal the one-process figures."""
    ranks = [rank["val"] for rank in lightning_ddp]
    one = ranks[0]["one_process"]
    assert one["pairs"] > 16
    for rank in ranks:
        assert rank["distributed"]["pairs"] == one["pairs"]
        for name, value in one.items():
            assert rank["distributed"][name] == pytest.approx(value, abs=1e-6), name


def test_a_raw_space_prior_from_scratch_takes_its_clip_statistics_from_the_train_split(prior_settings, tiny_embed):
    """prior.clip_space raw without init_from (the default configs'): clip_mean / clip_std are the per-dimension
    mean and std of the train split's raw image embeddings (unit × image_norm), exported with the weights; the
    sampler gives unit vectors, or raw ones whose norms are the data's."""
    from embeddings import store
    from training.data import embedding_shards
    from training.prior import raw_statistics

    settings, root = prior_settings
    config, _ = tiny_embed
    raw = np.concatenate(
        [
            store.raw_vectors(store.read_shard(shard.path), "image_embedding")
            for shard in embedding_shards(config.layout.embeddings, "train")
        ]
    )
    mean, std = raw_statistics(config.layout.embeddings)
    np.testing.assert_allclose(mean.numpy(), raw.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std.numpy(), raw.std(0, ddof=1), rtol=1e-4)
    overrides = dict(prior=dict(settings["prior"], clip_space="raw"), text_tokens="clip", name="scratch-raw")
    _run(settings, root, "scratch-raw", max_steps=3, val_every=1000, resume=None, **overrides)
    sampler = load_prior(root / "models" / "scratch-raw" / "prior")
    torch.testing.assert_close(sampler.net.transformer.clip_mean[0], mean)
    torch.testing.assert_close(sampler.net.transformer.clip_std[0], std)
    z_t = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    unit = sampler.sample(z_t, ["a red circle", "a blue square"], [0, 1], steps=2)
    raw_sample = sampler.sample(z_t, ["a red circle", "a blue square"], [0, 1], steps=2, raw=True)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw_sample, dim=-1))
    assert not torch.allclose(raw_sample.norm(dim=-1), torch.ones(2), atol=1e-3)  # denormalised, not unit


def test_a_view_trains_on_its_kept_keys_alone_and_resumes_onto_the_same_batch(prior_settings, tiny_embed, tmp_path):
    """view=<name>: the job reads only the view's kept train keys; a resumed run continues with the batch an
    uninterrupted one reads next, as on whole shards."""
    settings, root = prior_settings
    layout = tiny_embed[0].layout
    table = store.read_table(layout.embeddings, ["key", "split"]).to_pylist()
    dropped = {r["key"] for r in table if r["split"] == "train"}
    dropped = set(sorted(dropped)[::3])
    opt_out_view(layout, "prior-test", dropped, tmp_path)
    view = dict(view="prior-test", val_every=1000, batch_size=8)
    _, whole = _run(settings, root, "view-whole", max_steps=10, resume=None, **view)
    seen = [k for batch in whole.keys for k in batch]
    assert seen and not set(seen) & dropped
    _, first = _run(settings, root, "view-split", max_steps=10, checkpoint_every=4, resume=None, stop_at=4, **view)
    checkpoint = root / "view-split" / "train-prior-tiny-view-prior-test" / "checkpoints" / "step000004.ckpt"
    _, second = _run(settings, root, "view-split", max_steps=10, resume=str(checkpoint), **view)
    assert first.keys + second.keys == whole.keys
