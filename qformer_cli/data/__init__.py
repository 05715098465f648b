"""Data: readers for each format (all yielding :class:`Sample`), image transforms, and the
batching loader with per-rank sharding and the bad-sample policy.

Typical use::

    bad = BadSampleLog(skip=skip_bad_samples)
    files = sample_split_files("val")
    samples = read_vqa(files.vqa_questions, files.vqa_annotations, files.image_dir, bad=bad)
    transform = build_transform(load_transform_config(vision_model), train=False)
    loader = make_dataloader(SampleDataset(samples, transform, bad_samples=bad), batch_size=32)
    for batch in loader: ...  # batch.images (B, 3, H, W), batch.questions, ...
    print(bad.summary())
"""

from qformer_cli.data.caption_files import read_caption_file
from qformer_cli.data.coco import read_coco_captions
from qformer_cli.data.folder import read_image_folder
from qformer_cli.data.hf import (
    Columns,
    HFSampleSource,
    local_builder,
    open_hf_dataset,
    read_hf_dataset,
)
from qformer_cli.data.karpathy import read_karpathy
from qformer_cli.data.loader import (
    BadSample,
    Batch,
    LoadedSample,
    RankSampler,
    SampleDataset,
    SampleLoader,
    StreamingSampleDataset,
    collate_samples,
    inference_workers,
    make_dataloader,
)
from qformer_cli.data.sample import (
    BadSampleLog,
    ImageError,
    Sample,
    image_id_from_name,
    load_image,
    one_caption_per_sample,
)
from qformer_cli.data.sample_data import (
    SplitFiles,
    sample_backbone_dir,
    sample_data_dir,
    sample_split_files,
)
from qformer_cli.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    ImageTransformConfig,
    TrainTransform,
    build_transform,
    load_transform_config,
    transform_config_from_processor,
)
from qformer_cli.data.vqa import read_vqa

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "BadSample",
    "BadSampleLog",
    "Batch",
    "Columns",
    "EvalTransform",
    "HFSampleSource",
    "ImageError",
    "ImageTransformConfig",
    "LoadedSample",
    "RankSampler",
    "Sample",
    "SampleDataset",
    "SampleLoader",
    "SplitFiles",
    "StreamingSampleDataset",
    "TrainTransform",
    "build_transform",
    "collate_samples",
    "image_id_from_name",
    "inference_workers",
    "load_image",
    "load_transform_config",
    "local_builder",
    "make_dataloader",
    "one_caption_per_sample",
    "open_hf_dataset",
    "read_caption_file",
    "read_coco_captions",
    "read_hf_dataset",
    "read_image_folder",
    "read_karpathy",
    "read_vqa",
    "sample_backbone_dir",
    "sample_data_dir",
    "sample_split_files",
    "transform_config_from_processor",
]
