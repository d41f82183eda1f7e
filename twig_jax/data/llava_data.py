"""LLaVA instruction data -> fixed-shape training batches, with grain.

Input: LLaVA's instruction JSON (a list of {"id", "image"?, "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}) plus an image folder.

Text follows LLaVA-1.5's `preprocess_v1` (conv_vicuna_v1, SeparatorStyle.TWO):

    "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"

and only the assistant answers and their closing "</s>" are training targets. LLaVA finds those
tokens by round lengths with LLaMA-tokenizer-specific offsets ("- 2"); here each boundary is the
token count of the conversation prefix that ends there, which gives the same positions for the
LLaMA tokenizer and stays correct for any tokenizer (checked: a prefix whose tokens are not a
prefix of the full tokenisation makes the sample bad, as LLaVA masks such samples out).

Pipeline: source (records in memory) -> deterministic shuffle (seed) -> repeat -> per-process
shard (ShardByJaxProcess) -> map(encode + image preprocessing; thread prefetch) -> optional
multiprocessing prefetch (off by default) -> filter(bad samples, counted and reported in
consumption order) -> batch(drop_remainder). The iterator's get_state()/set_state() make the data order resumable.

Bad samples (missing image, unreadable image file, too long, malformed conversation, no answer
tokens, tokenisation mismatch) never crash the epoch: they are counted by reason, the first few of
each reason are logged with their ids, and they are skipped, or truncated when
`on_too_long="truncate"`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Protocol, Sequence

import numpy as np

from twig_jax.data.preprocess import IMAGE_PLACEHOLDER, VICUNA_V1_SYSTEM, ImagePreprocessor, tokenize_with_image

log = logging.getLogger("twig_jax.data")

ROLE_NAMES = {"human": "USER", "user": "USER", "gpt": "ASSISTANT", "assistant": "ASSISTANT"}
SEP = " "  # conv_vicuna_v1.sep, after the system prompt and each user turn
SEP2 = "</s>"  # conv_vicuna_v1.sep2, after each assistant turn

BAD_REASONS = ("missing_image", "unreadable_image", "too_long", "malformed", "no_labels", "tokenization_mismatch",
               "error")  # "error": any other exception while processing the sample


SAMPLE_FIELDS = ("tokens", "label_mask", "pixel_values", "length", "has_image", "index")  # every sample's


class SampleExtension(Protocol):
    """Extra batch fields computed per sample (e.g. a training target read from the record's own
    annotations). Picklable (grain workers may run it); every field has the same shape for every
    sample, so that samples batch."""

    @property
    def field_names(self) -> tuple[str, ...]: ...  # exactly the keys `sample_fields` returns

    def sample_fields(self, record: Mapping, tokens: np.ndarray, label_mask: np.ndarray,
                      encoder: ConversationEncoder) -> dict[str, np.ndarray]:
        """The fields of one sample; tokens / label_mask [max_len] as encoded by `encoder` (its
        tokenizer, image_token_index and num_image_tokens). Raises BadSample to skip the sample."""
        ...


@dataclasses.dataclass(frozen=True)
class DataConfig:
    json_path: str
    image_dir: str | None = None
    max_len: int = 2048  # every sequence is padded (or truncated / skipped) to this length
    batch_size: int = 8  # global batch; each process loads batch_size / process_count rows
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever (the trainer stops at its step count)
    on_too_long: str = "skip"  # "skip" or "truncate" (cut at max_len; a cut through the image skips)
    num_threads: int = 2  # grain ReadOptions threads for the map stage
    prefetch_buffer: int = 16
    worker_count: int = 0  # grain multiprocessing workers (0 = off: the default, for CPU)
    log_first: int = 5  # log the first N bad samples of each reason
    system: str = VICUNA_V1_SYSTEM
    extra_fields: SampleExtension | None = None  # adds its fields to every sample

    def validate(self) -> "DataConfig":
        if self.on_too_long not in ("skip", "truncate"):
            raise ValueError(f"on_too_long={self.on_too_long!r} must be 'skip' or 'truncate'")
        if self.extra_fields is not None:
            clash = sorted(set(self.extra_fields.field_names) & set(SAMPLE_FIELDS))
            if clash:
                raise ValueError(f"extra_fields {type(self.extra_fields).__name__} would replace the sample's {clash}")
        if self.max_len < 2:
            raise ValueError(f"max_len={self.max_len} too small")
        return self


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class BadSampleReport:
    """Counts of skipped / truncated samples by reason, with the first few ids of each."""

    def __init__(self, log_first: int = 5):
        self.log_first = log_first
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.truncated = 0
        self._lock = threading.Lock()

    def record(self, reason: str, sample_id: str, detail: str = "", *, action: str = "skipped") -> None:
        with self._lock:
            key = reason if action == "skipped" else f"{reason}_{action}"
            n = self.counts.get(key, 0) + 1
            self.counts[key] = n
            ex = self.examples.setdefault(key, [])
            if len(ex) < self.log_first:
                ex.append(str(sample_id))
            if n <= self.log_first:
                log.warning("bad sample %s (%s, %s): %s", sample_id, reason, action, detail)
            elif n in (10 * self.log_first, 100 * self.log_first, 1000 * self.log_first):
                log.warning("%d samples so far %s for %s", n, action, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def load(self, d: Mapping[str, Any]) -> None:
        self.counts = dict(d.get("counts", {}))
        self.examples = {k: list(v) for k, v in d.get("examples", {}).items()}

    def summary(self) -> str:
        if not self.counts:
            return "data: no bad samples"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"data: {self.total} bad samples ({parts}); first ids: {self.examples}"


# ----------------------------------------------------------------------------------------------
# Tokenizer + conversation


class CallableTokenizer:
    """Adapts a `tokenizers.Tokenizer` to the HF call convention tokenize_with_image expects."""

    def __init__(self, tok, bos_token: str | None = "<s>", eos_token: str | None = "</s>", pad_token: str | None = None):
        self.tok = tok
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = tok.token_to_id(pad_token) if pad_token else None

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": list(self.tok.encode(text).ids)}


def as_tokenizer(tok):
    """HF tokenizers are used as is; a raw `tokenizers.Tokenizer` is wrapped."""
    try:
        import tokenizers
    except ImportError:  # pragma: no cover
        return tok
    return CallableTokenizer(tok) if isinstance(tok, tokenizers.Tokenizer) else tok


def normalize_conversation(conversations: Sequence[Mapping[str, Any]], has_image: bool) -> list[tuple[str, str]]:
    """[(role, text)] alternating USER / ASSISTANT, as LLaVA's preprocess does: a leading non-human
    turn is dropped; with an image, "<image>" is moved to the front of the first user turn."""
    turns = []
    for i, msg in enumerate(conversations):
        if not isinstance(msg, Mapping) or "from" not in msg or "value" not in msg:
            raise BadSample("malformed", f"turn {i} is not a {{'from', 'value'}} object")
        role = ROLE_NAMES.get(str(msg["from"]).lower())
        if role is None:
            raise BadSample("malformed", f"turn {i} has unknown role {msg['from']!r}")
        turns.append((role, str(msg["value"])))
    if turns and turns[0][0] != "USER":
        turns = turns[1:]
    if len(turns) < 2:
        raise BadSample("malformed", "needs at least one user and one assistant turn")
    for i, (role, _) in enumerate(turns):
        if role != ("USER" if i % 2 == 0 else "ASSISTANT"):
            raise BadSample("malformed", f"turn {i} is {role}; roles must alternate USER / ASSISTANT")
    n_img = sum(t.count(IMAGE_PLACEHOLDER) for _, t in turns)
    if has_image:
        if n_img > 1:
            raise BadSample("malformed", f"{n_img} {IMAGE_PLACEHOLDER} markers for one image")
        first = turns[0][1].replace(IMAGE_PLACEHOLDER, "").strip()
        turns[0] = ("USER", f"{IMAGE_PLACEHOLDER}\n{first}")
    elif n_img:
        raise BadSample("malformed", f"{IMAGE_PLACEHOLDER} in the text but the sample has no image")
    return turns


def vicuna_v1_text(turns: Sequence[tuple[str, str]], system: str = VICUNA_V1_SYSTEM) -> tuple[str, list[tuple[int, int]]]:
    """The vicuna_v1 conversation string and, per assistant turn, the character offsets
    (end of "ASSISTANT:", end of "{answer}</s>") that bound its target tokens."""
    text = system + SEP
    spans = []
    for role, msg in turns:
        if role == "USER":
            text += f"{role}: {msg}{SEP}"
        else:
            text += f"{role}:"
            start = len(text)
            text += f" {msg}{SEP2}"
            spans.append((start, len(text)))
    return text, spans


class ConversationEncoder:
    """Conversation -> (token ids, label mask) with LLaVA-1.5's vicuna_v1 masking."""

    def __init__(self, tokenizer, image_token_index: int, num_image_tokens: int, max_len: int,
                 on_too_long: str = "skip", pad_id: int | None = None, system: str = VICUNA_V1_SYSTEM):
        self.tok = as_tokenizer(tokenizer)
        self.image_token_index = image_token_index
        self.num_image_tokens = num_image_tokens
        self.max_len = max_len
        self.on_too_long = on_too_long
        self.system = system
        if pad_id is None:
            pad_id = getattr(self.tok, "pad_token_id", None)
            if pad_id is None:
                pad_id = getattr(self.tok, "eos_token_id", None) or 0
        self.pad_id = int(pad_id)
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable for grain worker processes
        d = dict(self.__dict__)
        d.pop("_lock")
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _ids(self, text: str) -> list[int]:
        # HF fast tokenizers reset their truncation/padding state on every call, which is not
        # thread-safe ("Already borrowed"); grain's map stage runs on threads.
        with self._lock:
            return tokenize_with_image(self.tok, text, self.image_token_index, self.num_image_tokens,
                                       expected_images=text.count(IMAGE_PLACEHOLDER))

    def encode_unpadded(self, conversations, has_image: bool) -> tuple[list[int], list[int], bool]:
        """(ids, label_mask, truncated) before padding; raises BadSample."""
        turns = normalize_conversation(conversations, has_image)
        text, spans = vicuna_v1_text(turns, self.system)
        ids = self._ids(text)
        labels = [0] * len(ids)
        for start, end in spans:
            a, b = self._ids(text[:start]), self._ids(text[:end])
            if ids[:len(b)] != b or b[:len(a)] != a:
                raise BadSample("tokenization_mismatch", f"prefix ending at char {end} does not tokenise as a prefix")
            for j in range(len(a), len(b)):
                labels[j] = 1
        truncated = False
        if len(ids) > self.max_len:
            if self.on_too_long != "truncate":
                raise BadSample("too_long", f"{len(ids)} tokens > max_len {self.max_len}")
            img = [j for j, t in enumerate(ids) if t == self.image_token_index]
            if img and img[-1] >= self.max_len:
                raise BadSample("too_long", f"{len(ids)} tokens > max_len {self.max_len}; truncation would cut the image")
            ids, labels, truncated = ids[:self.max_len], labels[:self.max_len], True
        if not any(labels[1:]):
            raise BadSample("no_labels", "no answer tokens left to train on")
        return ids, labels, truncated

    def encode(self, conversations, has_image: bool) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """tokens [max_len] int32, label_mask [max_len] int32, length, truncated."""
        ids, labels, truncated = self.encode_unpadded(conversations, has_image)
        tokens = np.full((self.max_len,), self.pad_id, np.int32)  # [S]
        mask = np.zeros((self.max_len,), np.int32)  # [S]
        tokens[:len(ids)] = ids
        mask[:len(ids)] = labels
        return tokens, mask, len(ids), truncated


# ----------------------------------------------------------------------------------------------
# Source and per-sample processing


def load_records(json_path: str) -> list[dict]:
    with open(json_path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of samples")
    return records


class SampleProcessor:
    """(index, record) -> a training sample dict, or {"_bad": reason, ...} (filtered later)."""

    def __init__(self, encoder: ConversationEncoder, image_preprocessor: ImagePreprocessor, image_dir: str | None,
                 pixel_shape: tuple[int, int, int], extra_fields: SampleExtension | None = None):
        self.encoder = encoder
        self.images = image_preprocessor
        self.image_dir = image_dir
        self.pixel_shape = pixel_shape  # (3, H, W)
        self.extra_fields = extra_fields

    def __call__(self, item: tuple[int, Any]) -> dict[str, Any]:
        index, rec = item
        sid = str(rec.get("id", index)) if isinstance(rec, Mapping) else str(index)
        try:
            if not isinstance(rec, Mapping) or not isinstance(rec.get("conversations"), list):
                raise BadSample("malformed", "no 'conversations' list")
            has_image = rec.get("image") not in (None, "")
            tokens, mask, length, truncated = self.encoder.encode(rec["conversations"], has_image)
            extra = {}
            if self.extra_fields is not None:
                extra = self.extra_fields.sample_fields(rec, tokens, mask, self.encoder)
            pix = np.zeros(self.pixel_shape, np.float32)  # [3, H, W]
            if has_image:
                path = os.path.join(self.image_dir or "", str(rec["image"]))
                if not os.path.isfile(path):
                    raise BadSample("missing_image", path)
                try:
                    pix = self.images(path)[0]
                except (ValueError, OSError) as e:
                    raise BadSample("unreadable_image", f"{path}: {e}") from None
                if pix.shape != self.pixel_shape:
                    raise BadSample("unreadable_image", f"{path}: pixel shape {pix.shape} != {self.pixel_shape}")
        except BadSample as e:
            return {"_bad": e.reason, "_detail": e.detail, "_id": sid}
        except Exception as e:  # noqa: BLE001 - one odd sample must not end the epoch; it is reported
            return {"_bad": "error", "_detail": f"{type(e).__name__}: {e}", "_id": sid}
        if self.extra_fields is not None and set(extra) != set(self.extra_fields.field_names):
            # a wrong extension, not a bad sample: stop here rather than skip every sample
            raise ValueError(f"{type(self.extra_fields).__name__} returned fields {sorted(extra)}, "
                             f"declared {sorted(self.extra_fields.field_names)}")
        out = {"tokens": tokens, "label_mask": mask, "pixel_values": pix, "length": np.int32(length),
               "has_image": np.bool_(has_image), "index": np.int64(index), **extra}
        if truncated:
            out["_truncated"] = sid
        return out


class NoUsableSamples(RuntimeError):
    """A whole epoch's worth of consecutive bad samples: repeating would spin forever."""


class _CountAndDrop:
    """Iter-level filter: runs in consumption order, so counts are exact and deterministic."""

    def __init__(self, report: BadSampleReport, epoch_size: int):
        self.report = report
        self.epoch_size = max(1, epoch_size)
        self.bad_run = 0

    def __call__(self, sample: dict) -> bool:
        if "_bad" in sample:
            self.report.record(sample["_bad"], sample["_id"], sample["_detail"])
            self.bad_run += 1
            if self.bad_run >= self.epoch_size:
                raise NoUsableSamples(f"{self.bad_run} consecutive bad samples (a whole epoch): "
                                      f"{self.report.summary()}")
            return False
        self.bad_run = 0
        if "_truncated" in sample:
            self.report.record("too_long", sample.pop("_truncated"), "truncated to max_len", action="truncated")
        return True


def build_dataset(cfg: DataConfig, tokenizer, *, image_token_index: int, num_image_tokens: int,
                  image_preprocessor: ImagePreprocessor, pixel_shape: tuple[int, int, int],
                  report: BadSampleReport | None = None, records: list | None = None, shard=None):
    """The grain IterDataset of batches for this process. Returns (dataset, report)."""
    import grain

    cfg.validate()
    report = report if report is not None else BadSampleReport(cfg.log_first)
    records = load_records(cfg.json_path) if records is None else records
    shard = shard if shard is not None else grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if cfg.batch_size % shard.shard_count:
        raise ValueError(f"batch_size {cfg.batch_size} not divisible by {shard.shard_count} processes")
    encoder = ConversationEncoder(tokenizer, image_token_index, num_image_tokens, cfg.max_len, cfg.on_too_long,
                                  system=cfg.system)
    proc = SampleProcessor(encoder, image_preprocessor, cfg.image_dir, pixel_shape, cfg.extra_fields)
    ds = grain.MapDataset.source(list(enumerate(records)))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds[shard.shard_index::shard.shard_count]
    ds = ds.map(proc)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer))
    if cfg.worker_count > 0:
        # Workers run the (expensive) map; counting, dropping and batching stay in this process
        # so the bad-sample report sees every sample.
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; we are not an absl app
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    ds = ds.filter(_CountAndDrop(report, len(records) // shard.shard_count))
    ds = ds.batch(cfg.batch_size // shard.shard_count, drop_remainder=True)
    return ds, report


def default_image_preprocessor(model_cfg, model_dir: str | None = None) -> ImagePreprocessor:
    """The base model's preprocessor_config.json if it has one, else LLaVA-1.5's CLIP settings at
    the vision tower's image size."""
    if model_dir and os.path.isfile(os.path.join(model_dir, "preprocessor_config.json")):
        return ImagePreprocessor.from_pretrained(model_dir)
    from twig_jax.data.preprocess import LLAVA15_CLIP_PARAMS

    params = dict(LLAVA15_CLIP_PARAMS)
    size = model_cfg.vision.image_size
    params["crop_size"] = {"height": size, "width": size}
    params["size"] = {"shortest_edge": size}
    return ImagePreprocessor(params)


def make_train_iterator(cfg: DataConfig, tokenizer, model_cfg, *, image_preprocessor: ImagePreprocessor | None = None,
                        model_dir: str | None = None, report: BadSampleReport | None = None):
    """(iterator, report) for a LlavaConfig: image token id / count and pixel shape from the model."""
    pre = image_preprocessor or default_image_preprocessor(model_cfg, model_dir)
    size = model_cfg.vision.image_size
    ds, report = build_dataset(cfg, tokenizer, image_token_index=model_cfg.image_token_index,
                               num_image_tokens=model_cfg.num_image_tokens, image_preprocessor=pre,
                               pixel_shape=(model_cfg.vision.num_channels, size, size), report=report)
    return iter(ds), report


__all__ = ["DataConfig", "SampleExtension", "SAMPLE_FIELDS", "BadSample", "NoUsableSamples", "BadSampleReport",
           "CallableTokenizer", "as_tokenizer", "normalize_conversation", "vicuna_v1_text", "ConversationEncoder",
           "load_records", "SampleProcessor", "build_dataset", "default_image_preprocessor", "make_train_iterator",
           "BAD_REASONS"]
