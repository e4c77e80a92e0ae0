"""One typed schema for params.yaml, shared by the stages, the Optuna study and the GUI.

Every section forbids unknown keys, so a typo stops a run at start with the key's dotted name instead of being
silently ignored. `load_params` and `validate_params` turn pydantic's errors into one ParamsError (a ValueError):
its `errors` are records of the dotted key, what was expected and what came (a rule across fields, raised with
`_rule`, also names the fields it involves), and its text names the file and lists them, one line each.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from xbmcore.hashing import data_digest, file_digest

DATASETS = ("synthetic", "sop", "inshop", "cub", "cars", "vehicleid", "folder", "csv")
# The built-in backbones; any other is "timm:<name>" or "torchvision:<name>" (xbmcore.backbones).
BACKBONES = ("smallcnn", "resnet18", "resnet50")
BACKBONE_LIBRARIES = ("timm", "torchvision")
# The `data` keys that may say "auto": the model's input settles them (xbmcore.backbones.resolve_input).
AUTO_DATA_KEYS = ("train_size", "test_resize", "test_size", "cache_size", "interpolation", "mean", "std")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticParams(_Section):
    """The embedded SOP-like benchmark, generated from a seed (no download): `data.synthetic`.

    Attributes:
        num_classes: classes of train, val and test (8..20000); the first half train (and val), the second half
            test.
        images_per_class_min: the fewest images of a class (>= 2).
        images_per_class_max: the most images of a class (>= images_per_class_min); the counts lean towards the
            minimum, like SOP's long tail.
        classes_per_superclass: classes sharing one super-class (look-alike siblings: the hard negatives).
        image_size: the rendered images' side in pixels (16..256).
        seed: the generator's seed: the same seed and parameters give the same bytes on every machine.
        pretrain_classes: further classes, in super-classes of their own, for the `pretrain` split (0: none).
    """

    num_classes: int = Field(1000, ge=8, le=20000)
    images_per_class_min: int = Field(4, ge=2)
    images_per_class_max: int = Field(12, ge=2)
    classes_per_superclass: int = Field(10, ge=1)
    image_size: int = Field(32, ge=16, le=256)
    seed: int = 0
    # Classes rendered after the num_classes of train, val and test, in super-classes of their own: the `pretrain`
    # split, the same image family with other classes (as ImageNet is to SOP), for the pretrain stage.
    pretrain_classes: int = Field(0, ge=0, le=20000)

    @model_validator(mode="after")
    def _range(self) -> "SyntheticParams":
        if self.images_per_class_max < self.images_per_class_min:
            raise _rule(f"images_per_class_max ({self.images_per_class_max}) must be >= images_per_class_min "
                        f"({self.images_per_class_min})", "images_per_class_max", "images_per_class_min")
        if self.pretrain_classes and self.num_classes % self.classes_per_superclass:
            raise _rule(f"num_classes ({self.num_classes}) must be a multiple of classes_per_superclass "
                        f"({self.classes_per_superclass}) with pretrain_classes: no super-class may hold both "
                        f"pretraining classes and classes of train, val or test",
                        "num_classes", "classes_per_superclass", "pretrain_classes")
        return self


class DataParams(_Section):
    """Which dataset, where it lies, how it is split and how its images are shown to the network: `data`.

    Attributes:
        name: the dataset: ``synthetic`` (embedded, generated), ``sop``, ``inshop``, ``cub``, ``cars``,
            ``vehicleid`` (the published benchmarks), ``folder`` or ``csv`` (your own images).
        root: for the published datasets, the folder holding their folders; for ``folder``, the image folder
            itself (``<root>/<class>/<image>``); for ``csv``, the CSV file (header ``path,label[,split]``).
        prepared: where prepared datasets go (``<prepared>/<name>``).
        download: fetch a published dataset that is not under `root` (where it has a public address).
        val_fraction: the fraction of the training classes moved to a `val` split, in [0, 1) (whole classes).
        test_fraction: ``folder`` / ``csv`` without a given split: the fraction of classes held out for testing,
            drawn with `split_seed`, in (0, 1).
        split_seed: the seed of those class draws.
        skip_corrupt: leave out unreadable images (with a warning) instead of stopping.
        max_pixels: images over this many pixels (width x height, from the header) are refused as unreadable.
        cache_size: the shorter side real images are decoded to, once, into the prepared cache (256: the paper's
            Resize(256) before the 224 crop); ``auto``: test_resize as the model's input settles it.
        cache_workers: processes that decode images while the cache is built (None: one per CPU core).
        train_size: the side of the training crop (RandomResizedCrop's output), in pixels; ``auto``: the model's
            input size (``model.input_size``, else its weights' config: see `xbmcore.backbones`).
        test_resize: the shorter side test images are resized to before the centre crop; ``auto``: the model's
            input size divided by its weights' crop fraction (224 / 0.875 = 256).
        test_size: the side of the test centre crop (<= test_resize); ``auto``: the model's input size.
        interpolation: the resize filter of the crops and the test view: ``bilinear``, ``bicubic``, or ``auto``
            (the model's weights' config: timm's ``pretrained_cfg``; bilinear for the other backbones). The cache
            is built with bilinear whatever this says.
        mean: the per-channel mean (RGB, in [0, 1]) images are normalised with; ``auto``: the model's weights'
            config (ImageNet's for smallcnn, the ResNets and torchvision models).
        std: the per-channel standard deviation of that normalisation; ``auto`` as for `mean`.
        vehicleid_test: which VehicleID test list (800, 1600 or 2400 vehicles).
        train_crop_scale: the area range (low, high) of the training RandomResizedCrop, 0 < low <= high <= 1.
        num_workers: DataLoader worker processes (0: load in the training process).
        synthetic: the embedded benchmark's parameters.
    """

    name: Literal["synthetic", "sop", "inshop", "cub", "cars", "vehicleid", "folder", "csv"] = "synthetic"
    # The published datasets: the folder holding their folders. folder: the image folder itself. csv: the CSV file.
    root: str = "data/raw"
    prepared: str = "data/prepared"
    download: bool = True
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    # folder / csv without a given split: the fraction of classes (whole classes, never images) held out for
    # testing, drawn with split_seed, so evaluation is on unseen classes as in every DML benchmark.
    test_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    split_seed: int = 0
    skip_corrupt: bool = False
    # Images over this many pixels (width x height, read from the header) are refused as unreadable: in a folder,
    # by pipeline.embed, by the served model and the desktop app. A 97 KB PNG can decode to 81 MP (243 MB); Pillow
    # refuses more than 178,956,970 itself.
    max_pixels: int = Field(50_000_000, ge=1, le=178_956_970)
    # Real datasets are decoded once into a cache of images whose shorter side is cache_size (256: the paper's
    # Resize(256) before the 224 crop); training and evaluation read only the cache.
    cache_size: Annotated[int, Field(ge=8, le=4096)] | Literal["auto"] = 256
    # Processes that decode images while the cache is built (null: one per CPU core).
    cache_workers: int | None = Field(None, ge=1)
    # The sizes, the filter and the normalisation the network sees. auto: what the model's weights were trained
    # with (timm's pretrained_cfg, a config.json beside the weights file, model.input_size), resolved once when the
    # params are loaded (xbmcore.backbones.resolve_input); the defaults are the embedded set's.
    train_size: Annotated[int, Field(ge=8)] | Literal["auto"] = 32
    test_resize: Annotated[int, Field(ge=8)] | Literal["auto"] = 32
    test_size: Annotated[int, Field(ge=8)] | Literal["auto"] = 32
    interpolation: Literal["bilinear", "bicubic", "auto"] = "auto"
    mean: tuple[float, float, float] | Literal["auto"] = "auto"
    std: tuple[float, float, float] | Literal["auto"] = "auto"
    vehicleid_test: Literal[800, 1600, 2400] = 800
    # Area range of the training RandomResizedCrop. (0.2, 1) is the XBM reference code's setting; the embedded
    # set already varies position and scale, and its class details are a few pixels wide, so it gets a milder crop.
    train_crop_scale: tuple[float, float] = (0.5, 1.0)
    num_workers: int = Field(0, ge=0)
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _crop(self) -> "DataParams":
        lo, hi = self.train_crop_scale
        if not 0 < lo <= hi <= 1:
            raise _rule(f"train_crop_scale must satisfy 0 < low <= high <= 1, got {self.train_crop_scale}",
                        "train_crop_scale")
        if self.std != "auto" and min(self.std) <= 0:
            raise _rule(f"std: expected three standard deviations > 0, got {list(self.std)}", "std")
        return self

    def unresolved(self) -> list[str]:
        """The keys still set to ``auto``: `xbmcore.backbones.resolve_input` replaces them with the model's values.

        Returns:
            The dotted keys (``"data.train_size"``, ...); empty once resolved.
        """
        return [f"data.{k}" for k in AUTO_DATA_KEYS if getattr(self, k) == "auto"]


class ModelParams(_Section):
    """The embedding network (xbmcore.models): `model`.

    Attributes:
        backbone: ``smallcnn`` (four conv blocks, for the embedded benchmark on a CPU), ``resnet18`` or
            ``resnet50`` (torchvision), or any classification model of timm or torchvision as
            ``timm:<name>`` (``timm:vit_small_patch16_224``, a weights tag allowed:
            ``timm:vit_small_patch16_224.augreg_in21k_ft_in1k``) or ``torchvision:<name>``
            (``torchvision:convnext_tiny``): its classifier is replaced by the embedding head.
        embedding_dim: D, the embedding's dimension (>= 2).
        pretrained: ``none``, ``imagenet`` (torchvision's weights for the ResNets), or the path of a local
            weights file (safetensors or a torch state dict): the pretrain stage's output, a state dict of this
            model or of its backbone, or a timm or torchvision checkpoint of the named architecture (its
            classifier is left out).
        input_size: the side of the images the network is built for and fed, in pixels (None: its weights'
            config: timm's ``pretrained_cfg`` or a config.json beside the weights file; 224 for torchvision
            models and the ResNets, 32 for smallcnn). ``data.*: auto`` follow it; a timm ViT is built for it.
        freeze_bn: keep the backbone's BatchNorm statistics and affine parameters fixed (pretrained backbones,
            small batches).
        norm: smallcnn's normalisation: ``batch`` (BatchNorm) or ``group`` (GroupNorm: independent of the batch).
        sync_bn: with several processes, BatchNorm over the whole global batch (SyncBatchNorm; GPUs only).
    """

    # smallcnn, resnet18, resnet50, or timm:<name> / torchvision:<name>: any classification model of those
    # libraries, its classifier replaced by the embedding head (xbmcore.backbones).
    backbone: str = "smallcnn"
    embedding_dim: int = Field(128, ge=2)
    # none, imagenet (torchvision's weights for the ResNets), or the path of a local weights file (safetensors or
    # torch): the pretrain stage's output, or any state dict of this model or of its backbone (a timm or
    # torchvision checkpoint, say).
    pretrained: str = "none"
    # The side the network is built for and fed (null: the weights' config); data.*: auto follow it.
    input_size: int | None = Field(None, ge=8)
    freeze_bn: bool = False
    # smallcnn's normalisation: batch statistics (BatchNorm) or per-image channel groups (GroupNorm), which does
    # not depend on what else is in the batch and so trains the same at any batch size.
    norm: Literal["batch", "group"] = "batch"
    # With several processes, BatchNorm over the whole global batch (SyncBatchNorm) instead of each rank's part:
    # what one process with the global batch computes. A training choice: the saved model has plain BatchNorm.
    sync_bn: bool = False

    @model_validator(mode="after")
    def _pretrained(self) -> "ModelParams":
        library, _, name = self.backbone.partition(":")
        if self.backbone not in BACKBONES and (library not in BACKBONE_LIBRARIES or not name.strip()):
            raise _rule(f"backbone: expected {', '.join(BACKBONES)}, timm:<name> or torchvision:<name>, got "
                        f"{self.backbone!r}", "backbone")
        if not self.pretrained.strip():
            raise _rule("pretrained: expected none, imagenet or the path of a weights file, got an empty string",
                        "pretrained")
        return self


class PretrainParams(_Section):
    """The pretrain stage: the model trained as a classifier with a normalised softmax (cosine logits over one
    learned proxy per class, divided by a temperature) on the dataset's pretrain split: `pretrain`.

    Attributes:
        steps: optimiser steps (Adam, cosine decay of the lr to 0).
        batch_size: images per step (random images, not P x M).
        lr: the initial learning rate.
        weight_decay: Adam's weight decay.
        temperature: the softmax temperature dividing the cosine logits.
        seed: the seed of the image order (and, in the pipeline, of the model's and the proxies' initialisation).
        num_threads: CPU threads of the stage: torch, faiss and their BLAS (None: one per core).
    """

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    temperature: float = Field(0.05, gt=0.0)
    seed: int = 0
    num_threads: int | None = Field(None, ge=1)


class LossParams(_Section):
    """The pair loss of both terms (xbmcore.losses): `loss`.

    Attributes:
        name: ``contrastive`` (the paper's), ``multi_similarity`` or ``triplet``.
        margin: the contrastive loss's negative margin, a cosine in [-1, 1]: negatives more similar are pushed.
        ms_alpha: multi-similarity's positive scale (> 0).
        ms_beta: multi-similarity's negative scale (> 0).
        ms_base: multi-similarity's similarity offset, in [-1, 1].
        ms_epsilon: multi-similarity's mining margin (>= 0).
        triplet_margin: the triplet loss's margin (>= 0).
        reduction: ``mean_active`` (sum / active terms: independent of the memory size), ``sum_over_batch``
            (sum / B, as the official code: grows with the memory size) or ``mean_per_kind`` (contrastive only:
            the mean over the active positives plus the mean over the active negatives).
    """

    name: Literal["contrastive", "multi_similarity", "triplet"] = "contrastive"
    margin: float = Field(0.5, ge=-1.0, le=1.0)
    ms_alpha: float = Field(2.0, gt=0)
    ms_beta: float = Field(50.0, gt=0)
    ms_base: float = Field(0.5, ge=-1.0, le=1.0)
    ms_epsilon: float = Field(0.1, ge=0)
    triplet_margin: float = Field(0.1, ge=0)
    reduction: Literal["mean_active", "sum_over_batch", "mean_per_kind"] = "mean_active"

    @model_validator(mode="after")
    def _per_kind_is_contrastive(self) -> "LossParams":
        if self.reduction == "mean_per_kind" and self.name != "contrastive":
            raise _rule(f"mean_per_kind averages positive and negative pairs apart, which only the contrastive "
                        f"loss's terms are; {self.name} takes mean_active or sum_over_batch", "name", "reduction")
        return self


class MemoryParams(_Section):
    """The cross-batch memory (xbmcore.memory) and how it is kept consistent with the model: `memory`.

    Attributes:
        enabled: train the XBM phase with the memory; false runs the baseline (the same schedule without it).
        mode: ``queue`` (the paper's FIFO of embeddings) or ``index`` (one slot per training image).
        ratio: K as a fraction of the training set, in (0, 1] (used when `size` is None).
        size: K, the number of entries (None: ``round(ratio * N)``).
        weight: w in L = L(batch, batch) + w * L(batch, memory) (>= 0).
        dtype: the entries' storage dtype: ``float32``, ``bfloat16`` or ``float16``.
        enqueue: ``before`` (Alg. 1: the batch joins the memory before the loss pairs with it) or ``after``
            (the batch joins it for the next steps only).
        momentum: the entries are written by an exponential moving average of the model with this momentum
            (MoCo's key encoder), in [0, 1); 0: by the model itself.
        refresh: how many of the oldest entries are re-embedded with the current model at each step (0: none).
        sdc_sigma: drift compensation's Gaussian width (0: off).
        sdc_pool: the newest enqueued images whose drift observations compensation averages.
        store: ``embedding`` (the paper: the memory stores embeddings) or ``features`` (it stores the backbone's
            pooled features, which the current head embeds at every step); features excludes sdc_sigma and
            momentum.
    """

    enabled: bool = True
    mode: Literal["queue", "index"] = "queue"
    ratio: float = Field(0.5, gt=0.0, le=1.0)
    size: int | None = Field(None, ge=1)
    weight: float = Field(1.0, ge=0.0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # before: Alg. 1, the batch joins the memory before the loss pairs it with the memory; after: the batch joins
    # it for the next steps only (kept for the comparison).
    enqueue: Literal["before", "after"] = "before"
    # Keeping the entries consistent with the model (xbmcore/memory.py, xbmcore/trainer.py): an exponential moving
    # average of the model writes them (0: the model itself); the `refresh` oldest entries re-embedded each step;
    # drift compensation's Gaussian width (0: off) and the enqueued images its observations come from.
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    refresh: int = Field(0, ge=0)
    sdc_sigma: float = Field(0.0, ge=0.0)
    sdc_pool: int = Field(128, ge=1)
    # embedding: the memory stores the embeddings (the paper). features: it stores the backbone's pooled features,
    # and the current head embeds them at every step, so the entries follow the head wherever it moves.
    store: Literal["embedding", "features"] = "embedding"

    @model_validator(mode="after")
    def _store(self) -> "MemoryParams":
        if self.store == "features" and (self.sdc_sigma > 0 or self.momentum > 0):
            raise _rule("store: features keeps the backbone's features, which the current head embeds at every step; "
                        "it does not combine with sdc_sigma or momentum (set them to 0)", "store", "sdc_sigma",
                        "momentum")
        return self


class TrainParams(_Section):
    """The training run (xbmcore.trainer): `train`.

    Attributes:
        seed: the run's seed: the sampler's stream, the memory's initial images, the drift probe's images, the
            loader workers, and (in the pipeline) the model's initialisation and the augmentation.
        device: ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu`` or ``cuda``.
        batch_size: images per process and step (the global batch is nproc x batch_size); a multiple of
            images_per_class.
        images_per_class: M of the P x M batches.
        optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9, Nesterov).
        lr: the XBM (and baseline) phase's learning rate.
        warmup_lr: the warm-up phase's learning rate (separate, so that changing lr keeps the warm-up).
        weight_decay: the optimiser's weight decay.
        backbone_lr_scale: the backbone's lr as a fraction of the phase's lr (warmup_lr, lr); the head and the
            rest train at the phase's lr. 1: one lr for all (a large pretrained backbone: 0.1 or less).
        freeze_backbone_warmup: train only the head during the warm-up (the backbone's weights fixed, its
            BatchNorm statistics still adapting unless model.freeze_bn); the XBM phase trains everything.
        lr_schedule: ``constant``, or ``cosine``: a decay to 0 over the XBM phase (the warm-up stays constant).
        warmup_steps: the warm-up's steps, or ``auto``: end it at the first drift probe (from warmup_min_steps
            on) where the mean D(t; warmup_drift_dt) over warmup_drift_window probes is below warmup_drift, at
            warmup_max_steps at the latest.
        warmup_drift: the auto warm-up's drift threshold.
        warmup_drift_dt: the dt of the D(t; dt) the auto warm-up reads (one of drift_dts).
        warmup_drift_window: how many consecutive probes the auto rule averages.
        warmup_min_steps: the auto warm-up's earliest end.
        warmup_max_steps: the auto warm-up's latest end (its budget).
        drift_probe: the number of fixed training images the drift probe embeds (0: no probe).
        drift_every: steps between drift probes.
        drift_dts: the dt of each D(t; dt) the probe reports.
        memory_view_every: steps between memory views (xbmcore.memory_view: each probe anchor's hardest memory
            negatives with their age, a ``memory_view`` event) in a phase with a memory; one more at the phase's
            end. 0: off.
        memory_view_k: hardest memory negatives listed per anchor.
        memory_view_anchors: anchors listed in the view (the first of the drift probe's images, or a seeded
            subset of that many training images without a probe); all the probe's images count in its statistics.
        xbm_steps: the XBM (or baseline) phase's steps.
        checkpoint_every: steps between checkpoints.
        eval_every: steps between validation evaluations (0: none during training).
        num_threads: CPU threads of the training stages: torch, faiss and their BLAS (None: one per core).
        portable: compute with every library's kernels at the AVX2 level, so every x86-64 CPU with AVX2 gives
            the same bytes (xbmcore.portable).
        precision: ``auto`` (bfloat16 autocast on a GPU that has it, else float32), ``float32``, ``bfloat16``
            or ``float16`` (GPU only, with loss scaling).
        log_every: steps between reads of the step's scalars from the device (events, the NaN check): each read
            is a host-device sync.
        nproc: processes per node (torchrun); batch_size is per process.
    """

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(64, ge=2)
    images_per_class: int = Field(4, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    # The warm-up phase's own lr: a from-scratch model needs a large one, while the XBM phase needs the slow drift
    # a smaller one gives. Separate, so that changing train.lr leaves the warm-up (and its cached output) alone.
    warmup_lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    # Fine-tuning a large pretrained backbone: its lr as a fraction of the phase's (the head gets the whole), and a
    # warm-up that trains the head alone, so the random head's first gradients do not disturb pretrained features.
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0)
    freeze_backbone_warmup: bool = False
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # A number of steps, or "auto": end the warm-up at the first drift probe (from warmup_min_steps on) where the
    # mean of D(t; warmup_drift_dt) over the last warmup_drift_window probes is below warmup_drift, at
    # warmup_max_steps at the latest. The memory's premise is slow drift.
    warmup_steps: int | Literal["auto"] = 300
    warmup_drift: float = Field(0.35, gt=0.0)
    warmup_drift_dt: int = Field(100, ge=1)
    # auto: the rule reads the mean of D over this many consecutive probes (1: the last probe alone).
    warmup_drift_window: int = Field(3, ge=1)
    warmup_min_steps: int = Field(200, ge=0)
    warmup_max_steps: int = Field(3000, ge=1)
    # The drift probe (xbmcore.drift): D(t; dt) of `drift_probe` fixed training images (0: off) every
    # `drift_every` steps, for each dt in `drift_dts`.
    drift_probe: int = Field(0, ge=0)
    drift_every: int = Field(100, ge=1)
    drift_dts: list[int] = Field(default_factory=lambda: [10, 100, 1000])
    # The memory view (xbmcore.memory_view): every `memory_view_every` steps with a memory (0: off) and at the
    # phase's end, the `memory_view_k` hardest memory negatives of `memory_view_anchors` anchors, with their age.
    memory_view_every: int = Field(500, ge=0)
    memory_view_k: int = Field(8, ge=1)
    memory_view_anchors: int = Field(16, ge=1)
    xbm_steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    eval_every: int = Field(0, ge=0)
    num_threads: int | None = Field(None, ge=1)
    # The CPU kernels of every library at the AVX2 level (xbmcore.portable), so every x86-64 CPU with AVX2 computes
    # the same bytes; set for the whole process, so every stage that trains or embeds reads it.
    portable: bool = True
    # auto: bfloat16 autocast on a GPU that has it (tensor cores, float32's range so no loss scaling), float32 on
    # the CPU. float16 (GPUs without bfloat16) trains with a GradScaler.
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Steps between reads of the step's scalars from the device (events, MLflow, the NaN check): every read is a
    # host-device sync that stalls a GPU's queue.
    log_every: int = Field(1, ge=1)
    # Processes per node (torchrun); batch_size is per process, so the global batch is nproc x batch_size.
    nproc: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _pk(self) -> "TrainParams":
        if self.batch_size % self.images_per_class:
            raise _rule(f"batch_size ({self.batch_size}) must be a multiple of images_per_class "
                        f"({self.images_per_class})", "batch_size", "images_per_class")
        if isinstance(self.warmup_steps, int) and self.warmup_steps < 0:
            raise _rule(f"warmup_steps: expected a number of steps >= 0 or auto, got {self.warmup_steps}",
                        "warmup_steps")
        if not self.drift_dts or min(self.drift_dts) < 1:
            raise _rule(f"drift_dts: expected a non-empty list of steps >= 1, got {self.drift_dts}", "drift_dts")
        if self.warmup_steps == "auto":
            if not self.drift_probe:
                raise _rule("warmup_steps: auto ends the warm-up on the drift probe's D(t; dt); set drift_probe > 0 "
                            "(e.g. 512)", "warmup_steps", "drift_probe")
            if self.warmup_drift_dt not in self.drift_dts:
                raise _rule(f"warmup_drift_dt ({self.warmup_drift_dt}) must be one of drift_dts {self.drift_dts}: "
                            f"the probe measures only those", "warmup_drift_dt", "drift_dts")
            if self.warmup_min_steps > self.warmup_max_steps:
                raise _rule(f"warmup_min_steps ({self.warmup_min_steps}) must be <= warmup_max_steps "
                            f"({self.warmup_max_steps})", "warmup_min_steps", "warmup_max_steps")
        return self

    @property
    def warmup_budget(self) -> int:
        """The warm-up's length in steps: warmup_steps, or its upper bound when it is auto."""
        return self.warmup_max_steps if self.warmup_steps == "auto" else self.warmup_steps


class EvalParams(_Section):
    """Evaluation (xbmcore.evaluate): `eval`.

    Attributes:
        recall_at: the K of each Recall@K.
        batch_size: images per forward pass while embedding.
        num_threads: CPU threads of the evaluate stage (torch, faiss, their BLAS); None: one per core.
    """

    recall_at: list[int] = Field(default_factory=lambda: [1, 10, 100])
    batch_size: int = Field(256, ge=1)
    # CPU threads of the evaluate stage (torch, faiss, their BLAS); null: one per core.
    num_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ks(self) -> "EvalParams":
        if not self.recall_at or any(k < 1 for k in self.recall_at):
            raise _rule(f"recall_at must be a non-empty list of integers >= 1, got {self.recall_at}", "recall_at")
        return self


class TrackingParams(_Section):
    """Experiment tracking (the pipeline's MLflow glue): `tracking`.

    Attributes:
        experiment: the MLflow experiment's name.
        uri: the MLflow tracking URI (None: ``sqlite:///<project home>/mlflow.db``; the MLFLOW_TRACKING_URI
            environment variable overrides both).
        runs_dir: the folder of the runs' event files (``<runs_dir>/<run key>/events.jsonl``).
    """

    experiment: str = "xbm"
    uri: str | None = None
    runs_dir: str = "runs"


Range = tuple[float, float]


class TuneSpace(_Section):
    """Search ranges (low, high) of the Optuna study; null leaves a key at its params.yaml value.

    Each range maps to one params key (the Optuna parameter is named after it, e.g. "memory.ratio"), so the best
    trial converts to `dvc exp run -S key=value` without translation. Keys that the warm-up does not depend on are
    the only ones here: every trial then reuses one warm-up checkpoint.

    Attributes:
        memory_ratio: range of memory.ratio (log scale), within (0, 1].
        margin: range of loss.margin (the contrastive loss).
        triplet_margin: range of loss.triplet_margin (with loss.name triplet).
        memory_weight: range of memory.weight (log scale).
        lr: range of train.lr, the XBM phase's learning rate (log scale).
        ms_alpha: range of loss.ms_alpha (with loss.name multi_similarity).
        ms_beta: range of loss.ms_beta.
        ms_base: range of loss.ms_base.
    """

    # The paper's ablation spans 1% to 100% of the train set; log scale because the effect is multiplicative.
    memory_ratio: Range | None = (0.01, 1.0)
    # Contrastive negative margin: below ~0.3 nearly no negatives are active, above ~0.7 nearly all are.
    margin: Range | None = (0.3, 0.7)
    # Triplet margin (hardest positive/negative), used when loss.name is triplet.
    triplet_margin: Range | None = (0.05, 0.3)
    # w in L = L(batch) + w * L(memory); log scale, 1.0 (the paper) in the middle.
    memory_weight: Range | None = (0.25, 2.0)
    # train.lr, the XBM phase's learning rate (log scale; train.warmup_lr is not tuned, so the warm-up is shared).
    # Around the default 3e-5 of a pretrained start: the memory pays only while embeddings drift slowly.
    lr: Range | None = (1e-5, 3e-4)
    # Multi-similarity parameters, used when loss.name is multi_similarity (the MS paper's values lie inside).
    ms_alpha: Range | None = (1.0, 4.0)
    ms_beta: Range | None = (20.0, 60.0)
    ms_base: Range | None = (0.3, 0.7)

    @model_validator(mode="after")
    def _ordered(self) -> "TuneSpace":
        for name, r in self:
            if r is not None and not r[0] < r[1]:
                raise _rule(f"{name}: expected [low, high] with low < high, got {list(r)}", name)
        for name in ("memory_ratio", "memory_weight", "lr"):  # sampled on a log scale
            r = getattr(self, name)
            if r is not None and r[0] <= 0:
                raise _rule(f"{name}: a log-scale range needs low > 0, got {list(r)}", name)
        if self.memory_ratio is not None and self.memory_ratio[1] > 1.0:
            raise _rule(f"memory_ratio: the memory holds at most the whole train set (<= 1.0), "
                        f"got {list(self.memory_ratio)}", "memory_ratio")
        return self


class TuneParams(_Section):
    """The Optuna study (the pipeline's tune stage): `tune`.

    Attributes:
        study_name: the study's name in its storage.
        storage: an RDB URL or a journal file path (None: ``sqlite:///<project root>/optuna.db``).
        n_trials: the study's budget across restarts and workers (complete, pruned and failed trials count).
        sampler: ``tpe`` or ``random``.
        startup_trials: trials drawn at random before TPE models the results.
        seed: the sampler's seed; trial n draws from (seed, n).
        pruner: ``median`` or ``none``.
        prune_startup_trials: trials finished before pruning starts.
        prune_grace_steps: steps after the memory switches on during which a trial is not pruned.
        metric: the validation metric maximised: ``recall@1`` or ``map@r``.
        xbm_steps: XBM-phase steps per trial (None: train.xbm_steps).
        eval_every: validation interval in a trial (None: train.eval_every, or 5 points per trial when that is 0).
        heartbeat_s: seconds between a worker's heartbeats.
        stale_after_s: a running trial without a heartbeat for this long is failed by the next worker (more than
            twice heartbeat_s).
        keep_artifacts: ``best`` (delete the artifacts of finished trials that are not the best) or ``all``.
        space: the search ranges.
    """

    study_name: str = "xbm"
    # null: sqlite:///<project root>/optuna.db. An RDB URL (relative sqlite paths are taken from the project
    # root) or a plain path, which is a journal file (optuna JournalStorage) that several workers can share.
    storage: str | None = None
    # The budget of the study across restarts and workers: complete, pruned and failed trials all count.
    n_trials: int = Field(3, ge=1)
    sampler: Literal["tpe", "random"] = "tpe"
    # Trials drawn at random before TPE models the results (optuna's default is 10; studies here are short).
    startup_trials: int = Field(5, ge=0)
    # Sampler seed; trial n draws from (seed, n), so a one-worker study is reproducible and workers differ.
    seed: int = 0
    pruner: Literal["median", "none"] = "median"
    # Trials finished before pruning starts (the median of fewer is mostly noise).
    prune_startup_trials: int = Field(2, ge=0)
    # No pruning during the first steps after the memory switches on: the loss rebalances as the memory term
    # appears, and a trial must not be judged on its warm-up (which all trials share anyway).
    prune_grace_steps: int = Field(100, ge=0)
    metric: Literal["recall@1", "map@r"] = "recall@1"
    # XBM-phase steps per trial (null: train.xbm_steps); shorter trials buy more of them.
    xbm_steps: int | None = Field(None, ge=1)
    # Validation every N steps in a trial, the points the pruner judges (null: train.eval_every, or 5 points
    # per trial when that is 0).
    eval_every: int | None = Field(None, ge=1)
    # A RUNNING trial whose worker has not written a heartbeat for stale_after_s is failed by the next worker
    # that starts (a dead worker on this host is detected at once from its process id).
    heartbeat_s: float = Field(30.0, gt=0)
    stale_after_s: float = Field(300.0, gt=0)
    # "best": delete the artifacts of finished trials that are not the best (a resnet50 trial weighs ~0.3 GB).
    keep_artifacts: Literal["best", "all"] = "best"
    space: TuneSpace = TuneSpace()

    @model_validator(mode="after")
    def _stale(self) -> "TuneParams":
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise _rule(f"stale_after_s ({self.stale_after_s}) must exceed twice heartbeat_s "
                        f"({self.heartbeat_s}), or live trials would be failed", "stale_after_s", "heartbeat_s")
        return self


class ServeParams(_Section):
    """The served model: `serve`.

    Attributes:
        max_images: images per request (1..4096); a larger request is refused with HTTP 400 before decoding.
    """

    # Images per request to the served model (the evaluate stage logs it into the model's config); a larger
    # request is refused with HTTP 400 before any image is decoded.
    max_images: int = Field(64, ge=1, le=4096)


class Params(_Section):
    """The whole of params.yaml, one typed section per key; `load_params` reads and validates it.

    Every section forbids unknown keys and validates on assignment (``params.train.lr = 0`` raises).

    Attributes:
        data: the dataset.
        model: the embedding network.
        pretrain: the pretrain stage.
        loss: the pair loss.
        memory: the cross-batch memory.
        train: the training run.
        eval: evaluation.
        tracking: experiment tracking.
        tune: the Optuna study.
        serve: the served model.
    """

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams()
    loss: LossParams = LossParams()
    memory: MemoryParams = MemoryParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    tracking: TrackingParams = TrackingParams()
    tune: TuneParams = TuneParams()
    serve: ServeParams = ServeParams()

    def flat(self) -> dict[str, Any]:
        """Dotted keys (memory.ratio -> 0.5): the form MLflow, Optuna and `dvc exp run -S` use.

        Returns:
            ``{"data.name": "synthetic", ..., "memory.ratio": 0.5, ...}``, JSON values.
        """
        return flatten(self.model_dump(mode="json"))

    def digest(self, sections: tuple[str, ...] | None = None, *, drop: tuple[str, ...] = (),
               weights: Literal["content", "path"] = "content", extra: dict[str, Any] | None = None,
               length: int = 12) -> str:
        """The one digest of the params: a short stable hash of `sections` (all when None) without the dotted
        keys in `drop`, plus `extra` (e.g. the code's fingerprint).

        weights: "content" hashes a `model.pretrained` file by its bytes (sha256:...), so what is keyed is the
        weights, not where they lie (checkpoints, figure rows); "path" keeps the setting as written (the MLflow
        run key: the pretrain stage rewrites that file while one pipeline execution runs).

        Args:
            sections: the top-level sections to hash (e.g. ``("data", "model")``); None: all.
            drop: dotted keys left out (``"train.eval_every"``).
            weights: ``"content"`` or ``"path"``, how `model.pretrained` enters the hash (see above).
            extra: further JSON-able data hashed with the params.
            length: hex characters of the digest.

        Returns:
            A hex digest of `length` characters, independent of dict order.
        """
        d = self.model_dump(mode="json")
        if weights == "content" and (sha := pretrained_sha256(d["model"]["pretrained"])):
            d["model"]["pretrained"] = "sha256:" + sha
        if sections is not None:
            d = {k: d[k] for k in sections}
        for key in drop:
            section, name = key.split(".", 1)
            if section in d:
                d[section].pop(name, None)
        return data_digest({**d, **(extra or {})}, length)


def pretrained_sha256(pretrained: str) -> str | None:
    """sha256 of a `model.pretrained` weights file, None for none, imagenet or a path that is not a file: what a
    run depends on is the weights' bytes, not where they lie.

    Args:
        pretrained: the `model.pretrained` setting.

    Returns:
        The file's sha256 in hex, or None.
    """
    if pretrained in ("none", "imagenet") or not Path(pretrained).is_file():
        return None
    return file_digest(pretrained)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``.

    Args:
        d: a nested mapping with string keys.
        prefix: prepended to every key (used by the recursion).

    Returns:
        The flat dict; non-dict values (lists included) are leaves.
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass(frozen=True)
class ParamError:
    """One problem with the params: `path` the dotted key ("train.lr"; "train" for a rule across a section's
    fields, which names them in `fields`; "<root>" for the whole file), what is wrong, and the value that came
    (for a rule across fields: {field: value}).

    Attributes:
        path: the dotted key (``"train.lr"``), a section for a cross-field rule, ``"<root>"`` for the file.
        message: what is wrong or expected.
        value: the value that came.
        fields: the dotted keys a cross-field rule involves; () for a single key.
    """

    path: str
    message: str
    value: Any = None
    fields: tuple[str, ...] = ()  # dotted keys a cross-field rule involves; () for a single key

    def keys(self) -> tuple[str, ...]:
        """The keys to mark: the fields a rule names, else the path itself.

        Returns:
            Dotted keys (what a form highlights).
        """
        return self.fields or (self.path,)

    def __str__(self) -> str:
        return f"{self.path}: {self.message} (got {self.value!r})"


class ParamsError(ValueError):
    """Params the schema refuses: `errors` holds one ParamError per problem, str() is the report a person reads
    (the source, then one line per error). A ValueError, so callers that only print it need not know it.

    Args:
        errors: one ParamError per problem.
        source: where the params came from (a file name, "override"), the report's first word.
        text: the message; None: the source and one line per error.

    Attributes:
        errors (list[ParamError]): the problems.
        source (str): where the params came from.
    """

    def __init__(self, errors: list[ParamError], source: str = "params", text: str | None = None):
        self.errors = list(errors)
        self.source = source
        super().__init__(text or "\n".join([f"{source}: invalid parameters", *(f"  {e}" for e in self.errors)]))


def _rule(message: str, *fields: str) -> PydanticCustomError:
    """A rule across a section's fields, raised from its validator: the fields travel with the error as data."""
    return PydanticCustomError("cross_field", message, {"fields": fields})


_UNION_TAG = re.compile(r"[\[\-]")
_TYPE_TAGS = {"int", "float", "str", "bool", "tuple", "list", "dict", "none"}


def param_errors(err: ValidationError) -> list[ParamError]:
    """pydantic's errors as ParamError records.

    Args:
        err: the ValidationError of a ``Params`` validation.

    Returns:
        One ParamError per pydantic error; unknown keys and cross-field rules get readable messages.
    """
    out: list[ParamError] = []
    for e in err.errors():
        # A union's branches (an int or "auto") add their tag to the location: the key is what a person set.
        loc = [str(p) for p in e["loc"] if not _UNION_TAG.search(str(p)) and str(p) not in _TYPE_TAGS]
        path = ".".join(loc) or "<root>"
        if e["type"] != "cross_field" and out and out[-1].path == path and len(loc) < len(e["loc"]):
            out[-1] = ParamError(path, f"{out[-1].message}, or {e['msg'][0].lower()}{e['msg'][1:]}", out[-1].value)
            continue
        value = e.get("input")
        fields: tuple[str, ...] = ()
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and section)"
        elif e["type"] == "cross_field":
            fields = tuple(".".join([*loc, f]) for f in e["ctx"]["fields"])
            if isinstance(value, dict):
                value = {f: value.get(f) for f in e["ctx"]["fields"] if f in value}
            elif hasattr(value, "__dict__"):  # a section given as a model instance
                value = {f: getattr(value, f, None) for f in e["ctx"]["fields"]}
        out.append(ParamError(path, msg, value, fields))
    return out


def validate_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """The params of a mapping (params.yaml's content); ParamsError names each refused key.

    Args:
        raw: the mapping of sections (missing sections and keys take their defaults); None: all defaults.
        source: named in the error report.

    Returns:
        The validated Params.

    Raises:
        ParamsError: unknown keys, values of the wrong type or range, or broken cross-field rules, all listed.
    """
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(param_errors(err), source) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read and validate a params file; `overrides` are `dvc exp run -S` style `a.b=value` strings.

    Args:
        path: the YAML file (params.yaml).
        overrides: ``"section.key=value"`` strings applied in order before validation; each value is parsed as
            YAML (``memory.ratio=0.2``, ``train.drift_dts=[10,100]``).

    Returns:
        The validated Params.

    Raises:
        ValueError: a missing file, invalid YAML, or a top level that is not a mapping.
        ParamsError: an invalid override or invalid params (a ValueError too).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    for ov in overrides or []:
        set_dotted(raw, ov)
    return validate_params(raw, str(path))


def set_dotted(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML (0.2, true, [1, 10]).

    Args:
        raw: the params mapping to change (sections are created where missing).
        assignment: ``"a.b=value"``; the key may be any depth (``data.synthetic.seed=3``).

    Raises:
        ParamsError: no ``=``, or a key that runs through a value that is not a section.
    """
    if "=" not in assignment:
        text = f"override {assignment!r}: expected KEY=VALUE, e.g. memory.ratio=0.2"
        raise ParamsError([ParamError(assignment.strip(), "expected KEY=VALUE", assignment)], "override", text)
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for n, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            text = f"override {assignment!r}: {p} is not a section"
            path = ".".join(parts[:n + 1])
            raise ParamsError([ParamError(path, "not a section", node)], "override", text)
    node[parts[-1]] = yaml.safe_load(value)
