"""Batch streams over shards for each modality: the bridge from the data pipeline to the run loop."""
from __future__ import annotations

import torch

from d2v.config.schema import D2vConfig
from d2v.data.fixed_stream import FixedBatchStream, RawSample, validation_batches


def image_decoder(cfg: D2vConfig, *, train: bool = True):
    from d2v.data.image import ImageTransform, decode_image, image_collate

    m, mk = cfg.model, cfg.masking
    transform = ImageTransform(m.image.image_size, m.image.mean, m.image.std, scale=m.image.crop_scale,
                               color_jitter=m.image.color_jitter, train=train)
    grid = (m.image.image_size // m.image.patch_size,) * 2
    masks_v2 = None
    if m.v2.enabled:
        from d2v.masking.multimask import multi_mask_fn

        masks_v2 = multi_mask_fn(cfg)

    def decode(raw: list[RawSample], g: torch.Generator):
        images, labels, keys, bad = [], [], [], 0
        for sample in raw:
            try:
                images.append(transform(decode_image(sample), g))
            except Exception:  # noqa: BLE001 - a corrupt image inside a shard is skipped and counted
                bad += 1
                continue
            labels.append(int(sample.get("cls", b"-1")))
            keys.append(sample["__key__"])
        if not images:
            raise RuntimeError(f"a whole batch of {len(raw)} images failed to decode (shard {raw[0]['__shard__']})")
        if masks_v2 is not None:
            from d2v.data.image import image_collate_v2

            return image_collate_v2(images, labels, keys, mask_fn=masks_v2, g=g), bad
        return image_collate(images, labels, keys, grid=grid, num_masked=mk.num_mask_patches,
                             min_block=mk.min_block_patches, max_block=mk.max_block_patches,
                             min_aspect=mk.min_aspect, top_up=mk.top_up, g=g), bad

    return decode


def text_decoder(cfg: D2vConfig):
    from d2v.data.text import decode_tokens, text_collate

    t, mk = cfg.model.text, cfg.masking
    masks_v2 = None
    if cfg.model.v2.enabled:
        from d2v.masking.multimask import multi_mask_fn

        masks_v2 = multi_mask_fn(cfg)

    def decode(raw: list[RawSample], g: torch.Generator):
        blocks, keys, bad = [], [], 0
        for sample in raw:
            try:
                block = decode_tokens(sample)
                if block.numel() > t.max_positions or int(block.max()) >= t.vocab_size:
                    raise ValueError("block does not fit the model")
            except Exception:  # noqa: BLE001 - a corrupt block is skipped and counted
                bad += 1
                continue
            blocks.append(block)
            keys.append(sample["__key__"])
        if not blocks:
            raise RuntimeError(f"a whole batch of {len(raw)} text blocks failed to decode (shard {raw[0]['__shard__']})")
        if masks_v2 is not None:
            from d2v.data.text import text_collate_v2

            return text_collate_v2(blocks, keys, pad_id=t.pad_id, mask_fn=masks_v2, g=g), bad
        return text_collate(blocks, keys, pad_id=t.pad_id, mask_id=t.vocab_size - 1, kind=mk.kind,
                            mask_prob=mk.mask_prob, mask_length=mk.mask_length,
                            random_token_prob=mk.random_token_prob, leave_unmasked_prob=mk.leave_unmasked_prob,
                            g=g), bad

    return decode


def shard_stream_factories(cfg: D2vConfig):
    """(make_stream(rank, world), make_val_stream(rank, world) or None) for the config's modality."""
    modality = cfg.model.modality
    if modality == "audio":
        from d2v.train.audio_streams import audio_stream_factories

        return audio_stream_factories(cfg)
    if modality == "text":
        from d2v.data.text import check_tokenizer, load_tokenizer_meta

        for pattern in filter(None, (cfg.data.train_shards, cfg.data.val_shards)):
            check_tokenizer(load_tokenizer_meta(pattern), cfg.model.text)
        train_decode, val_decode = text_decoder(cfg), text_decoder(cfg)
    else:
        train_decode, val_decode = image_decoder(cfg, train=True), image_decoder(cfg, train=False)

    def make_stream(rank: int, world_size: int) -> FixedBatchStream:
        return FixedBatchStream(cfg.data.train_shards, train_decode, batch_size=cfg.train.micro_batch_size, rank=rank,
                                world_size=world_size, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                                shuffle_buffer=min(cfg.data.buffer_size, 4096))

    make_val = None
    if cfg.data.val_shards:
        def make_val(rank: int, world_size: int):
            return validation_batches(cfg.data.val_shards, val_decode, batch_size=cfg.train.micro_batch_size,
                                      rank=rank, world_size=world_size, seed=cfg.train.seed)

    return make_stream, make_val
