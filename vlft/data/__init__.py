"""Data pipeline: media processing, dataset formats, chat template + labels, collator, packing, data check."""

from vlft.data.collator import Collator, sample_position_ids
from vlft.data.config import DataConfig, DatasetConfig
from vlft.data.dataset import (MixedDataset, SampleProcessor, SkipCounter, Skipped,
                               build_datasets, iterate_batches, mix_order)
from vlft.data.errors import BadInput, SampleError, TooManySkipped
from vlft.data.formats import MediaResolver, RecordSource, to_messages
from vlft.data.grounding import ImageScale, image_scale, to_original, to_resized
from vlft.data.image import process_image, smart_resize
from vlft.data.packing import cu_seqlens_for_rows, pack_first_fit
from vlft.data.template import Media, Message, SpecialIds, encode_conversation
from vlft.data.video import VideoInfo, process_video, smart_nframes

__all__ = [
    "process_image", "smart_resize", "process_video", "smart_nframes", "VideoInfo",
    "DataConfig", "DatasetConfig", "SampleProcessor", "MixedDataset", "build_datasets",
    "mix_order", "Skipped", "SkipCounter", "iterate_batches", "Collator", "sample_position_ids",
    "pack_first_fit", "cu_seqlens_for_rows", "BadInput", "SampleError", "TooManySkipped", "MediaResolver",
    "RecordSource", "to_messages", "Media", "Message", "SpecialIds", "encode_conversation",
    "ImageScale", "image_scale", "to_resized", "to_original",
]
