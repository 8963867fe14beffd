"""Torch-free configuration of one trial: the data, the training budget and the latency protocol."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DatasetName = Literal["digits", "synthetic", "cifar10", "cifar100", "imagefolder", "coco", "shapes"]
#: Datasets of the detection task (spsa_nas.detection.data); the others are classification data.
DETECTION_DATASETS: tuple[str, ...] = ("coco", "shapes")
#: What runs a latency measurement's forward passes (LatencyConfig.runtime, docs/latency.md).
LatencyRuntime = Literal["eager", "compiled", "onnxruntime"]
LATENCY_RUNTIMES: tuple[str, ...] = ("eager", "compiled", "onnxruntime")
#: The runtimes that can measure a detector (task: detection): torch.compile is refused, because a
#: detector's data-dependent box counts recompile it mid-measurement (docs/latency.md).
DETECTION_LATENCY_RUNTIMES: tuple[str, ...] = ("eager", "onnxruntime")


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Config):
    """Which data a trial trains and evaluates on, and how it is split."""

    name: DatasetName = "digits"
    # coco: a directory relative to `data_root` with annotations/instances_train.json (and
    # instances_val.json) and the images in train/ (val/), or COCO 2017's train2017 names.
    # imagefolder: a directory relative to `data_root` with train/ (and optionally val/, test/)
    # or one folder per class; cifar10/cifar100: where the torchvision files are, relative to
    # `data_root` (default: the data root itself).
    path: str | None = None
    # Where datasets live. Set by the process (CLI flag or service setting), not by a client.
    data_root: str | None = None
    download: bool = False  # cifar only: fetch the files if absent (needs internet)
    train_subset: float | None = Field(
        None, gt=0, description="fraction (<=1) or number (>1) of training samples to use"
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5)  # carved out of the training split
    test_fraction: float = Field(0.2, gt=0, lt=0.5)  # digits/synthetic: the held-out split
    seed: int = 0  # the split's seed (the same for every trial of a search)
    # synthetic only: a generated, learnable classification problem
    synthetic_samples: int = Field(512, ge=16, le=1_000_000)
    synthetic_classes: int = Field(4, ge=2, le=1000)
    synthetic_size: int = Field(16, ge=4, le=512)
    # shapes only (detection): a generated COCO-format dataset under the data root
    shapes_images: int = Field(128, ge=2, le=100_000)
    shapes_size: int = Field(128, ge=16, le=1024)
    shapes_categories: int = Field(3, ge=1, le=3, description="square, circle, triangle")


class TrainConfig(_Config):
    """The training budget and recipe of a trial (the paper's: SGD, cosine, label smoothing)."""

    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    warmup_epochs: int = Field(0, ge=0)
    image_size: int | None = Field(None, ge=8, le=4096, description="None: the spec's input_size")
    amp: Literal["auto", "on", "off"] = "auto"  # auto: bf16/fp16 autocast on CUDA only
    channels_last: bool = False
    max_steps_per_epoch: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0, le=64)
    seed: int = 0

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise ValueError("warmup_epochs must be smaller than epochs")
        return self


class LatencyConfig(_Config):
    """How latency is measured (spsa_nas.latency, docs/latency.md).

    protocol "interleaved" (the default): the candidate and a fixed reference model (the plain
    backbone at `reference_width`) timed in alternating blocks in one process; warm-up until the
    block means settle; the figure is the median of block means with an order-statistic confidence
    interval; blocks are added while the interval is wider than `max_ci_rel`. "simple": the first
    protocol (fixed warm-up, median of single calls, no interval), kept to compare against.

    runtime: what runs the forward passes, candidate and reference alike: "eager" (PyTorch, the
    default), "compiled" (`torch.compile`, default mode; compiling and warm-up untimed) or
    "onnxruntime" (the ONNX file spsa_nas.export writes, in an onnxruntime session with `threads`
    intra-op threads). channels_last applies to eager and compiled only.
    """

    batch_size: int = Field(1, ge=1, le=1024)
    warmup: int = Field(5, ge=0, le=10_000, description="untimed calls at least (per model)")
    repeats: int = Field(30, ge=3, le=100_000, description="timed calls at least (per model)")
    min_time_s: float = Field(0.0, ge=0, le=600, description="keep repeating until this long")
    threads: int | None = Field(1, ge=1, le=1024, description="torch threads; None: torch's default")
    channels_last: bool = False
    protocol: Literal["interleaved", "simple"] = "interleaved"
    # The reference: the spec's backbone with no attention at this width (same stem, input, classes);
    # None: no reference (no ratio is recorded).
    reference_width: float | None = Field(0.5, gt=0, le=4.0)
    blocks: int = Field(12, ge=4, le=10_000, description="timed blocks per model, at least")
    block_ms: float = Field(20.0, gt=0, le=1000, description="target duration of one block")
    ci_level: float = Field(0.95, ge=0.5, lt=1.0, description="confidence of the intervals")
    max_ci_rel: float = Field(0.03, gt=0, le=10, description="add blocks while the interval's "
                                                             "width / estimate is wider than this")
    max_time_s: float = Field(15.0, gt=0, le=3600, description="time budget of the timed blocks, "
                                                               "per model, re-measurements included "
                                                               "(min_time_s when larger)")
    settle_rel: float = Field(0.05, gt=0, le=1, description="warm-up ends when two successive "
                                                            "warm-up blocks agree within this")
    max_warmup_s: float = Field(5.0, ge=0, le=600, description="warm-up budget, per model")
    pin_cpus: bool = Field(False, description="pin the measuring thread to `threads` CPUs (Linux)")
    runtime: LatencyRuntime = Field("eager", description="what runs the timed forward passes: eager "
                                                         "PyTorch, torch.compile, or onnxruntime on "
                                                         "the exported ONNX graph")

    @model_validator(mode="after")
    def _runtime_layout(self) -> LatencyConfig:
        if self.runtime == "onnxruntime" and self.channels_last:
            raise ValueError("latency.channels_last applies to the eager and compiled runtimes; "
                             "onnxruntime chooses its own layout: set channels_last false")
        return self
