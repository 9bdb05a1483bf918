"""`make embed`: webdataset shards → CLIP embedding shards (Parquet), one per tar, on Ray.

The shard is the unit of work, retry and resume. A pool of Ray actors each loads the encoder once
(GPU actors where GPUs exist, CPU otherwise) and embeds whole shards: it reads the tar, decodes
images in a thread pool while the previous batch is encoded, resizes and normalises each batch on the
encoder's device (ClipEncoder.preprocess_on_device), embeds images and captions
in batches, and writes the shard's parquet and then its record (store.write_shard). A sample whose
image cannot be decoded is skipped and counted with its reason. Finished shards are skipped on a
rerun; only the driver writes `_manifest.json`.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from embeddings import storage, store
from embeddings.config import ConfigError
from embeddings.encoders import EncoderSpec, load_encoder
from embeddings.hardware import precision_name
from embeddings.tars import DamagedTar, finished_tars, iter_tar_samples, tar_info
from pipelines.cluster import ray_session

# img2dataset's own bookkeeping, not worth carrying into the embedding shards.
_DROPPED = {"key", "caption", "status", "error_message", "exif", "__index_level_0__"}


def passthrough_table(tar_path, keys: list[str], samples: list[dict]) -> pa.Table:
    """Passthrough columns for `keys`: typed from img2dataset's shard parquet when present, else the json."""
    download_meta = storage.as_path(tar_path).with_suffix(".parquet")
    if download_meta.is_file():
        table = storage.read_parquet(download_meta)
        table = table.filter(pa.compute.is_in(table.column("key"), pa.array(keys)))
        order = {k: i for i, k in enumerate(table.column("key").to_pylist())}
        missing = [k for k in keys if k not in order]
        if not missing:
            table = table.take(pa.array([order[k] for k in keys]))
            return table.drop_columns([c for c in table.column_names if c in _DROPPED])
    by_key = {s["key"]: s["meta"] for s in samples}
    rows = [{k: v for k, v in by_key[key].items() if k not in _DROPPED} for key in keys]
    return pa.Table.from_pylist(rows) if rows and rows[0] else pa.table({})


def _node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


DECODERS = ("auto", "torchvision", "pil")


class ShardEmbedder:
    """Embeds whole shards with one loaded encoder; the body of each Ray actor."""

    def __init__(
        self,
        spec: dict,
        output_dir: str,
        dtype: str = "float16",
        batch_size: int = 256,
        decode_threads: int = 4,
        decoder: str = "auto",
    ):
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
        self.encoder = load_encoder(spec)
        self.output_dir = storage.as_path(output_dir)
        self.dtype, self.batch_size = dtype, batch_size
        self.pool = ThreadPoolExecutor(decode_threads)
        on_gpu = torch.device(self.encoder.device).type == "cuda"
        self.decode_on_device = decoder == "torchvision" or (decoder == "auto" and on_gpu)

    def info(self) -> dict:
        return self.encoder.info

    def _decode(self, sample: dict):
        """Decoded (H, W, 3) uint8 pixels of one sample, or the reason it cannot be used."""
        if sample["image"] is None:
            return None, "no image in the tar"
        try:
            with Image.open(io.BytesIO(sample["image"])) as image:
                image = image.convert("RGB")
                # Threads only decode; resize, crop and normalise run batched on the encoder's device
                # (no torch ops in the threads, so they never fight the encoder's own threads).
                return np.asarray(image), None
        except Exception as err:  # noqa: BLE001 (any decoding failure is a counted skip)
            return None, f"image decode error: {type(err).__name__}"

    def _decode_on_device(self, batch: list[dict]) -> tuple[list, int]:
        """A batch's JPEGs decoded by torchvision on the encoder's device (nvJPEG on a GPU) in one call; an image
        that is not a JPEG, or that this decoder refuses, goes to PIL (`_decode`, in the decode threads).
        Returns each sample's (pixels, reason) and how many went to PIL."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        results: list = [None] * len(batch)
        jpegs = [i for i, s in enumerate(batch) if s["image"] is not None and s["image"][:3] == b"\xff\xd8\xff"]
        data = [torch.frombuffer(bytearray(batch[i]["image"]), dtype=torch.uint8) for i in jpegs]
        device = self.encoder.device

        def decode(part: list) -> list:
            """One call for the part; where one image fails the call, each half again (a few bad images cost a
            few calls more, not one call per image)."""
            try:
                return decode_jpeg(part, mode=ImageReadMode.RGB, device=device) if part else []
            except RuntimeError:
                if len(part) == 1:
                    return [None]
                return decode(part[: len(part) // 2]) + decode(part[len(part) // 2 :])

        for i, image in zip(jpegs, decode(data)):
            results[i] = (image, None) if image is not None else None
        to_pil = [i for i, r in enumerate(results) if r is None]
        for i, result in zip(to_pil, self.pool.map(lambda i: self._decode(batch[i]), to_pil)):
            results[i] = result
        return results, sum(batch[i]["image"] is not None for i in to_pil)

    def process(self, tar_path: str) -> dict:
        """Embed one tar into NNNNN.parquet + NNNNN_record.json; returns the record. A tar that cannot be
        read to its end writes nothing (the samples before the damage are dropped too, so a repaired
        shard is embedded whole) and returns {'shard', 'damaged': reason}."""
        start = time.time()
        tar_path = storage.as_path(tar_path)
        try:
            samples = list(iter_tar_samples(tar_path))
            expected, _ = tar_info(tar_path)  # the successes img2dataset recorded for this tar
            found = sum(s["image"] is not None for s in samples)
            if found != expected:
                raise DamagedTar(tar_path, f"holds {found} samples where the download recorded {expected}")
        except DamagedTar as err:
            return {"shard": store.shard_name(tar_path), "damaged": err.reason}
        skipped: Counter = Counter()
        keys, captions, image_vectors, text_vectors, norms = [], [], [], [], []
        batches = [samples[i : i + self.batch_size] for i in range(0, len(samples), self.batch_size)]
        to_pil = 0
        if self.decode_on_device:
            decoded = (self._decode_on_device(batch) for batch in batches)
        else:
            decoded = ((r, 0) for r in self.pool.map(lambda batch: [self._decode(s) for s in batch], batches))
        for batch, (results, fallbacks) in zip(batches, decoded):
            to_pil += fallbacks
            good = [(s, pixels) for s, (pixels, reason) in zip(batch, results) if pixels is not None]
            skipped.update(reason for _, reason in results if reason is not None)
            if not good:
                continue
            pixels = self.encoder.preprocess_on_device([p for _, p in good])
            unit_i, image_norm = self.encoder.encode_images(pixels, norms=True)
            unit_t, text_norm = self.encoder.encode_texts([s["caption"] for s, _ in good], norms=True)
            image_vectors.append(unit_i.numpy())
            text_vectors.append(unit_t.numpy())
            norms += list(zip(image_norm.tolist(), text_norm.tolist()))
            keys += [s["key"] for s, _ in good]
            captions += [s["caption"] for s, _ in good]
        dim = self.encoder.dim
        z_i = np.concatenate(image_vectors) if image_vectors else np.zeros((0, dim), np.float32)
        z_t = np.concatenate(text_vectors) if text_vectors else np.zeros((0, dim), np.float32)
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "caption": pa.array(captions, pa.string()),
                "image_embedding": store.vectors_to_arrow(z_i, self.dtype),
                "text_embedding": store.vectors_to_arrow(z_t, self.dtype),
                "image_norm": pa.array([n[0] for n in norms], pa.float32()),
                "text_norm": pa.array([n[1] for n in norms], pa.float32()),
            }
        )
        extra = passthrough_table(tar_path, keys, samples)
        for name in extra.column_names:
            if name not in table.column_names:
                table = table.append_column(name, extra.column(name))
        name = store.shard_name(tar_path)
        record = {
            "shard": name,
            "rows_written": len(keys),
            "skipped": dict(skipped),
            "seconds": round(time.time() - start, 2),
            "node": _node_id(),
        }
        if self.decode_on_device:  # how many images its decoder left to PIL (not JPEGs, or refused)
            record["decoded_by_pil"] = to_pil
        store.write_shard(self.output_dir, name, table, record)
        return record


def start_actors(cls: type, args: tuple, num_actors: int | None, cpus_per_actor: float | None, shards: int) -> list:
    """The embedding actors: one per GPU where the cluster has GPUs; else one per node (all its CPUs).

    `num_actors` and `cpus_per_actor` override the counts. CPU actors are pinned softly to their node,
    so the work spreads over every node of a cluster; a lost actor is not restarted (run_shards hands
    its shard to the others).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    placements = []  # (cpus, gpus, scheduling strategy) of each actor
    if gpus:
        cpus = cpus_per_actor or max(1, int(ray.cluster_resources().get("CPU", 1)) // gpus - 1)
        placements = [(cpus, 1, "SPREAD")] * max(1, min(num_actors or gpus, shards))
    else:
        n_actors = max(1, min(num_actors or len(nodes), shards))
        per_node = -(-n_actors // len(nodes))
        for i in range(n_actors):
            node = nodes[i % len(nodes)]
            cpus = cpus_per_actor or max(1, int(node["Resources"]["CPU"]) // per_node)
            placements.append((cpus, 0, NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)))
    actors = []
    for cpus, n_gpus, strategy in placements:
        options = dict(
            num_cpus=cpus,
            num_gpus=n_gpus,
            scheduling_strategy=strategy,
            max_restarts=0,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(int(cpus))}},
        )
        actors.append(ray.remote(cls).options(**options).remote(*args))
    return actors


def live_actors(actors: list) -> tuple[list, dict]:
    """The actors that started (one placed on a node that has just died never does) and the encoder's info."""
    import ray

    live, infos = [], []
    for actor in actors:
        try:
            infos.append(ray.get(actor.info.remote()))
            live.append(actor)
        except ray.exceptions.RayActorError as err:
            print(f"[embed] an embedding actor did not start ({type(err).__name__}); going on without it", flush=True)
    if not live:
        raise RuntimeError("no embedding actor could start on the cluster")
    formats = sorted({i["compute_dtype"] for i in infos})
    if len(formats) > 1:
        raise ConfigError(
            f"the embedding actors chose different number formats ({', '.join(formats)}) for precision auto: "
            "set embed.encoder.precision (bf16 or fp32) so that every shard is computed alike"
        )
    return live, infos[0]


def run_shards(actors: list, tars: list):
    """Yield each tar's record as actors finish them; a shard whose actor dies (its node lost) goes to another."""
    import ray

    queue, running, idle = list(tars), {}, list(actors)
    while queue or running:
        while queue and idle:
            actor, tar = idle.pop(), queue.pop(0)
            running[actor.process.remote(str(tar))] = (actor, tar)
        if not running:
            raise RuntimeError(
                f"every embedding actor was lost; {len(queue)} shards left: run the job again to finish them"
            )
        [ready], _ = ray.wait(list(running), num_returns=1)
        actor, tar = running.pop(ready)
        try:
            record = ray.get(ready)
        except ray.exceptions.RayActorError as err:
            print(
                f"[embed] lost the actor embedding {tar.name} ({type(err).__name__}); the shard goes to another actor",
                flush=True,
            )
            queue.insert(0, tar)
            continue
        idle.append(actor)
        yield record


def embed(
    shards_dir: str | Path,
    output_dir: str | Path,
    *,
    encoder: dict | None = None,
    dtype: str = "float16",
    batch_size: int = 256,
    num_actors: int | None = None,
    cpus_per_actor: float | None = None,
    decode_threads: int = 4,
    decoder: str = "auto",
) -> dict:
    """Embed every finished tar of `shards_dir` into `output_dir`; returns the manifest.

    `encoder` holds EncoderSpec fields (model, weights, pretrained, precision, device); precision auto, on a
    folder with finished shards, keeps the format they were computed in (see _resume_precision). On a cluster
    with GPUs there is one actor per GPU; otherwise one per node (see start_actors). `decoder`: 'auto'
    decodes JPEGs with torchvision on the GPU where the encoder runs on one (the CPUs then only read the
    tars) and with PIL in `decode_threads` threads elsewhere; 'torchvision' or 'pil' forces either
    (torchvision on a CPU encoder decodes on the CPU). Images torchvision cannot decode go to PIL, counted
    in each record as `decoded_by_pil`.
    """
    if decoder not in DECODERS:
        raise ConfigError(f"embed: decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    import ray

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"embed: dtype {dtype!r}: use float16 or float32")
    spec = dict(encoder or {})
    EncoderSpec(**spec)  # unknown keys fail here, before Ray starts
    shards_dir, output_dir = storage.absolute(shards_dir), storage.absolute(output_dir)
    tars = finished_tars(shards_dir)  # img2dataset writes a tar's _stats.json after the tar
    if not tars:
        raise ConfigError(f"no webdataset shards in {shards_dir}: run `make download` first")
    storage.make_folder(output_dir)
    done = store.done_shards(output_dir)
    spec = _resume_precision(spec, output_dir, bool(done))
    todo = [t for t in tars if store.shard_name(t) not in done]
    if not todo and (output_dir / store.MANIFEST).exists():  # nothing to embed: no Ray, just the check
        manifest = store.read_manifest(output_dir)
        store.check_compatible(manifest, load_encoder(spec).info)
        return store.write_manifest(
            output_dir, manifest["encoder"], manifest["dtype"], dict(sorted(done.items())), complete=True
        )

    with ray_session():
        actors = start_actors(
            ShardEmbedder,
            (spec, str(output_dir), dtype, batch_size, decode_threads, decoder),
            num_actors,
            cpus_per_actor,
            len(todo),
        )
        actors, info = live_actors(actors)
        if (output_dir / store.MANIFEST).exists():
            store.check_compatible(store.read_manifest(output_dir), info)
        # Written first (complete: false) so that a rerun after a kill checks the encoder too.
        store.write_manifest(output_dir, info, dtype, dict(sorted(done.items())), complete=False)
        counts = {store.shard_name(t): _count(t) for t in todo}
        damaged: dict[str, str] = {}
        with tqdm(total=sum(counts.values()), unit="sample", desc=f"embed {len(todo)}/{len(tars)} shards") as bar:
            for record in run_shards(actors, todo):
                if "damaged" in record:
                    damaged[record["shard"]] = record["damaged"]
                    bar.update(counts[record["shard"]])
                    continue
                done[record["shard"]] = record
                bar.update(record["rows_written"] + sum(record["skipped"].values()))
        for actor in actors:
            ray.kill(actor)
    manifest = store.write_manifest(
        output_dir, info, dtype, dict(sorted(done.items())), complete=not damaged, damaged=damaged
    )
    if damaged:
        raise DamagedShards(manifest)
    return manifest


def _resume_precision(spec: dict, output_dir, has_shards: bool) -> dict:
    """`spec` for a rerun onto a folder with finished shards (`has_shards`): precision 'auto' pinned to the format the folder's
    manifest recorded, so that the shards it adds are computed as the first run's were (auto measures the
    machine, and a busy machine may measure otherwise); an explicit precision that differs is refused."""
    if not has_shards or not (output_dir / store.MANIFEST).exists():
        return spec
    recorded = store.read_manifest(output_dir)["encoder"].get("compute_dtype")
    if recorded is None:  # written before the format was recorded
        return spec
    try:
        kept = precision_name(recorded)
    except ValueError as err:
        raise ConfigError(
            f"{output_dir}: the manifest's compute_dtype {recorded!r} is not one embed computes in"
        ) from err
    asked = EncoderSpec(**spec).precision
    if asked == "auto":
        print(f"[embed] precision auto keeps the format {output_dir} was embedded in: {recorded}", flush=True)
        return {**spec, "precision": kept}
    if asked != kept:
        raise ConfigError(
            f"{output_dir} holds shards computed in {recorded}; precision {asked} would add shards computed "
            f"otherwise: set precision auto or {kept}, or start the folder again (`make reset-embeddings`)"
        )
    return spec


def _count(tar) -> int:
    """A tar's sample count for the progress bar (0 for a damaged tar without img2dataset's parquet)."""
    try:
        return tar_info(tar)[0]
    except DamagedTar:
        return 0


class DamagedShards(RuntimeError):
    """The embed job finished every shard it could read; `damaged` ({shard: reason}) could not be read to
    their end, wrote nothing, and are done again by a rerun once repaired."""

    def __init__(self, manifest: dict):
        self.manifest, self.damaged = manifest, manifest["damaged"]
        lines = "\n".join(f"  {shard}: {reason}" for shard, reason in sorted(self.damaged.items()))
        super().__init__(
            f"{len(self.damaged)} damaged shard(s) not embedded ({manifest['shards']} others done, "
            f"{manifest['rows']} samples):\n{lines}"
        )
