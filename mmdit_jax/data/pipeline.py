"""`make_train_data`: this process's share of every global batch, encoded, with exactly restorable state.

How a batch is drawn (identical on every process, so a global batch is one shape):
- Images are grouped into aspect-ratio buckets (folder: nearest aspect, small buckets merged into their
  nearest neighbour; a registered source: one square bucket; arrayrecord: one bucket per latent shape).
- Each bucket's examples, sorted by key, are dealt to processes round-robin (example i goes to process
  i % process_count): shards are disjoint and cover the data, and each process only ever reads its own.
- Each process streams every bucket's shard through grain: `MapDataset.shuffle(seed).repeat()` (a new
  order every epoch), `random_map` to decode/resize/crop/flip (the crop and flip draws depend only on the
  seed and the stream position), optional reader threads.
- Step k's bucket is drawn from `seed` and k alone, weighted by the buckets' global sizes; the process
  pulls `batch_size` readable examples from that bucket's stream. Unreadable examples are skipped and
  counted and the next ones taken, so every batch is full.
- Raw batches (folder, registered sources) are encoded by the jitted VAE and text encoders in this process.
State = the step, each bucket stream's grain iterator state and the skip counters: restoring it replays
exactly the batches an uninterrupted run would see.
"""
from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from mmdit_jax.data import buckets as bk
from mmdit_jax.data.arrayrecord import RecordSet, decode_record, open_source
from mmdit_jax.data.config import DataConfig
from mmdit_jax.data.folder import BAD_IMAGE, read_caption, read_image, scan_folder
from mmdit_jax.errors import MMDiTError

STATE_VERSION = 1
# data kind -> fn(resolution, seed) -> grain random-access source of {image uint8 (R, R, 3), caption};
# filled by extensions' train_hooks modules (mmdit_jax.plugins)
_SOURCES: dict = {}


def register_source(kind: str, fn) -> None:
    _SOURCES[kind] = fn


def sources() -> dict:
    from mmdit_jax.plugins import load_plugins

    load_plugins()
    return dict(_SOURCES)


@dataclasses.dataclass(frozen=True)
class Skip:
    """What a loader returns instead of an example it cannot read."""
    key: str
    reason: str


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# loaders: (item, rng) -> example dict or Skip; module level so grain could ship them to processes -------
def _load_folder(item, rng, *, shape, random_crop, flip):
    try:
        image, caption = read_image(item), read_caption(item)
    except BAD_IMAGE as e:
        return Skip(item.key, f"unreadable: {type(e).__name__}: {e}")
    return {"key": item.key, "caption": caption,
            "image": bk.fit(image, shape, rng, random_crop=random_crop, flip=flip)}


def _load_source(index, rng, *, source, shape, random_crop, flip):
    ex = source[int(index)]
    return {"key": str(int(index)), "caption": ex["caption"],
            "image": bk.fit(np.asarray(ex["image"], np.uint8), shape, rng, random_crop=random_crop, flip=flip)}


def _load_record(index, rng, *, source, name):
    key = f"{name}:{int(index)}"
    try:
        rec = decode_record(source[int(index)])
    except ValueError as e:
        return Skip(key, str(e))
    return {"key": rec["key"], "latents": rec["latents"], "context": rec["context"], "pooled": rec["pooled"]}


class _Stream:
    """One bucket's shard for this process as an endless grain stream, its iterator made on first use."""

    def __init__(self, items, load, seed: int, shuffle: bool, threads: int, buffer: int):
        ds = grain.MapDataset.source(items)
        if shuffle:
            ds = ds.shuffle(seed=_seed(seed, 1))
        self.ds = ds.repeat().random_map(load, seed=_seed(seed, 2))
        self.length = len(items)
        self.read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
        self._it = None

    def __next__(self):
        if self._it is None:
            self._it = iter(self.ds.to_iter_dataset(self.read))
        return next(self._it)

    def get_state(self):
        return None if self._it is None else self._it.get_state()  # None: not started

    def set_state(self, state):
        self._it = None
        if state is not None:
            self._it = iter(self.ds.to_iter_dataset(self.read))
            self._it.set_state(state)


class TrainData:
    """Iterator over this process's share of each global batch: dicts of host float32 arrays `latents`
    (B, h, w, C), `context` (B, L, D), `pooled` (B, P). See the module docstring."""

    def __init__(self, *, kind, streams, shapes, latent_shapes, counts, batch_size, seed, encoders, null_text,
                 text_layout, signature, scan_skipped=None, notes=None):
        self.kind, self._streams, self.shapes, self.latent_shapes = kind, streams, shapes, latent_shapes
        self._weights = np.asarray(counts, np.float64) / float(sum(counts))
        self.batch_size, self.seed, self._encoders = batch_size, seed, encoders
        self.null_text, self.text_layout = null_text, text_layout
        self._signature = signature
        self._scan_skipped = dict(scan_skipped or {})
        self._notes = dict(notes or {})
        self._step, self._skipped, self._skip_events = 0, {}, 0
        self.last_keys: list[str] = []  # the examples of the latest batch (for logs and tests)

    def __iter__(self):
        return self

    @property
    def encoders(self):
        """The VAE and text encoders batches are encoded with (None for precomputed data)."""
        return self._encoders

    def bucket_at(self, step: int) -> int:
        """The bucket of global batch `step`: a function of (seed, step) only, the same on every process."""
        if len(self._streams) == 1:
            return 0
        return int(np.random.default_rng(_seed(self.seed, 3, step)).choice(len(self._weights), p=self._weights))

    def _pull(self, b: int) -> list[dict]:
        stream, got, misses = self._streams[b], [], 0
        while len(got) < self.batch_size:
            ex = next(stream)
            if isinstance(ex, Skip):
                self._skipped.setdefault(ex.key, ex.reason)
                self._skip_events += 1
                misses += 1
                if misses >= stream.length:
                    raise MMDiTError(f"data: every example of bucket {self.shapes[b]} in this process's shard "
                                     f"is unreadable (e.g. {ex.key}: {ex.reason})")
                continue
            misses = 0
            got.append(ex)
        return got

    def __next__(self) -> dict:
        b = self.bucket_at(self._step)
        examples = self._pull(b)
        if self._encoders is None:  # precomputed
            batch = {k: np.stack([e[k] for e in examples]) for k in ("latents", "context", "pooled")}
        else:
            batch = self._encoders(np.stack([e["image"] for e in examples]), [e["caption"] for e in examples])
        self._step += 1
        self.last_keys = [e["key"] for e in examples]
        return batch

    # checkpointing ------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "signature": self._signature, "step": self._step,
                "streams": [s.get_state() for s in self._streams], "skipped": dict(self._skipped),
                "skip_events": self._skip_events}

    def set_state(self, state: dict):
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise MMDiTError(f"data state: expected a version {STATE_VERSION} state dict")
        theirs = state.get("signature")
        if theirs != self._signature:
            diff = sorted(k for k in set(self._signature) | set(theirs or {})
                          if (theirs or {}).get(k) != self._signature.get(k))
            raise MMDiTError(f"data state was saved for a different dataset or setup (differs in: "
                             f"{', '.join(diff)})")
        for s, st in zip(self._streams, state["streams"]):
            s.set_state(st)
        self._step = int(state["step"])
        self._skipped = dict(state["skipped"])
        self._skip_events = int(state["skip_events"])

    def stats(self) -> dict:
        """Counters: `skipped` (distinct unreadable files: at the folder scan, which covers the whole folder,
        plus those met while loading this process's shard), `skip_events`, `batches`, and kind-specific
        notes (uncaptioned images, dropped buckets; an endless registered source replaces `examples`)."""
        return {"skipped": len(self._scan_skipped) + len(self._skipped),
                "skipped_at_scan": len(self._scan_skipped), "skipped_at_load": len(self._skipped),
                "skip_events": self._skip_events, "batches": self._step,
                "examples": sum(s.length for s in self._streams), "buckets": len(self._streams), **self._notes}

    @property
    def skipped(self) -> dict:
        """key -> why, for every file skipped so far."""
        return {**self._scan_skipped, **self._skipped}


def _check_multiple(value: int, multiple: int, what: str):
    if value % multiple:
        raise MMDiTError(f"data {what} {value} must be a multiple of {multiple} (the VAE's downsampling "
                         "times the 2x2 latent patches)")


def make_train_data(cfg: DataConfig, *, batch_size: int, seed: int, encoders_path: str | None,
                    dtype: str = "float32", process_index: int = 0, process_count: int = 1) -> TrainData:
    """This process's data (see the module docstring). `batch_size` is per process."""
    if not isinstance(cfg, DataConfig):
        raise MMDiTError(f"make_train_data needs a DataConfig, got {type(cfg).__name__}")
    cfg.check_path()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MMDiTError(f"data batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(process_count, int) and process_count >= 1 and 0 <= process_index < process_count):
        raise MMDiTError(f"data process_index {process_index!r} must lie in [0, process_count={process_count!r})")
    seed = int(seed)
    threads = cfg.num_workers
    buffer = max(2 * batch_size, 2 * threads) if threads else 0
    p, n_proc = process_index, process_count
    common = dict(batch_size=batch_size, seed=seed)
    signature = {"kind": cfg.kind, "seed": seed, "batch_size": batch_size, "process_index": p,
                 "process_count": n_proc, "shuffle": cfg.shuffle}

    if cfg.kind == "arrayrecord":
        if cfg.random_flip or cfg.random_crop:
            raise MMDiTError("data random_flip / random_crop need on-the-fly encoding (kind 'folder'), not "
                             "precomputed latents")
        rs = RecordSet(cfg.path)
        n_meta = rs.meta.get("max_sequence_length")
        if cfg.max_sequence_length is not None and cfg.max_sequence_length != n_meta:
            raise MMDiTError(f"{cfg.path}: precomputed with max_sequence_length={n_meta}, but the data config "
                             f"asks for {cfg.max_sequence_length}")
        kept = [b for b in rs.buckets if b[3] >= n_proc]  # a bucket smaller than that cannot be dealt out
        if not kept:
            raise MMDiTError(f"{cfg.path}: no latent shape has at least process_count={n_proc} examples")
        streams = []
        for i, (_, lshape, file, count) in enumerate(kept):
            load = functools.partial(_load_record, source=open_source(file), name=file)
            streams.append(_Stream(range(p, count, n_proc), load, _seed(seed, 100 + i), cfg.shuffle, threads,
                                   buffer))
        signature["buckets"] = [[*b[1], b[3]] for b in kept]
        dropped = sum(b[3] for b in rs.buckets) - sum(b[3] for b in kept)
        return TrainData(kind=cfg.kind, streams=streams, shapes=[b[0] for b in kept],
                         latent_shapes=[b[1] for b in kept], counts=[b[3] for b in kept], encoders=None,
                         null_text=rs.null_text, text_layout=rs.text_layout, signature=signature,
                         scan_skipped=rs.meta.get("skipped"), notes={"dropped_small_buckets": dropped},
                         **common)

    if not encoders_path:
        raise MMDiTError(f"data kind {cfg.kind!r} encodes on the fly and needs encoders_path (a pipeline folder)")
    from mmdit_jax.data.encode import load_encoders

    enc = load_encoders(encoders_path, dtype, cfg.max_sequence_length)
    m, f, c = enc.pixel_multiple, enc.vae.config.downsample_factor, enc.vae.config.latent_channels
    aug = dict(random_crop=cfg.random_crop, flip=cfg.random_flip)
    signature.update(resolution=cfg.resolution, random_crop=cfg.random_crop, random_flip=cfg.random_flip)
    notes, scan_skipped = {}, {}
    if cfg.kind != "folder":
        makers = sources()
        if cfg.kind not in makers:
            raise MMDiTError(f"data kind {cfg.kind!r}: no source registered; known: "
                             f"{', '.join(['folder', 'arrayrecord', *sorted(makers)])}")
        _check_multiple(cfg.resolution, m, "resolution")
        source = makers[cfg.kind](cfg.resolution, seed)
        shapes, counts = [(cfg.resolution, cfg.resolution)], [len(source)]
        if counts[0] < n_proc:
            raise MMDiTError(f"{cfg.kind} dataset of {counts[0]} examples cannot be shared by {n_proc} processes")
        load = functools.partial(_load_source, source=source, shape=shapes[0], **aug)
        streams = [_Stream(range(p, counts[0], n_proc), load, _seed(seed, 100), cfg.shuffle, threads, buffer)]
        if getattr(source, "endless", False):
            notes["examples"] = "endless (drawn per index)"
    else:  # folder
        scan = scan_folder(cfg.path, cfg.caption_ext)
        scan_skipped = scan.skipped
        if not scan.items:
            raise MMDiTError(f"{cfg.path}: no readable image")
        if cfg.buckets:
            _check_multiple(cfg.bucket_step, m, "bucket_step")
            all_shapes = bk.make_buckets(cfg.resolution, cfg.bucket_step)
        else:
            _check_multiple(cfg.resolution, m, "resolution")
            all_shapes = [(cfg.resolution, cfg.resolution)]
        assign = [bk.nearest_bucket(it.height, it.width, all_shapes) for it in scan.items]
        assign = bk.merge_small(assign, all_shapes, batch_size * n_proc)
        used = sorted(set(assign))
        if len(scan.items) < n_proc:
            raise MMDiTError(f"{cfg.path}: {len(scan.items)} readable images cannot be shared by {n_proc} "
                             "processes")
        shapes, counts, streams = [], [], []
        for i, b in enumerate(used):
            members = [it for it, a in zip(scan.items, assign) if a == b]
            load = functools.partial(_load_folder, shape=all_shapes[b], **aug)
            streams.append(_Stream(members[p::n_proc], load, _seed(seed, 100 + i), cfg.shuffle, threads, buffer))
            shapes.append(all_shapes[b])
            counts.append(len(members))
        notes["uncaptioned"] = scan.uncaptioned
        signature["bucket_step"] = cfg.bucket_step
    signature["buckets"] = [[*s, n] for s, n in zip(shapes, counts)]
    latent_shapes = [(h // f, w // f, c) for h, w in shapes]
    return TrainData(kind=cfg.kind, streams=streams, shapes=shapes, latent_shapes=latent_shapes, counts=counts,
                     encoders=enc, null_text=enc.null_text, text_layout=enc.text_layout, signature=signature,
                     scan_skipped=scan_skipped, notes=notes, **common)
