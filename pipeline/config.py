"""The pipeline's config schema: strict pydantic models loaded from YAML with ``yaml.safe_load``.

Every field has a default and a description. Unknown keys are errors. Any problem becomes one
:class:`~kdpipe.errors.ConfigError` naming the key path and the file. This module must not import
torch: ``kdpipe status`` and config validation stay fast.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

import kdpipe.teachers as shipped
from kdpipe.errors import ConfigError, UsageError
from kdpipe.launch import launched_world_size
from kdpipe.yamlfile import load_file as load_yaml_file
from kdpipe.yamlfile import loads as load_yaml


class Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` is bad input, not a run that diverges (or a report JSON cannot hold)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's ``true`` is not the number 1: pydantic would accept it for an int or float field."""
        if isinstance(value, bool) and info.field_name:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation in (int, float, int | None, float | None):
                raise ValueError(f"must be a number, got {str(value).lower()}")
        return value


# ----------------------------------------------------------------------------------------------- data
class Normalize(Section):
    mean: list[float] = Field(description="Per-channel mean subtracted from pixels in [0, 1].")
    std: list[float] = Field(description="Per-channel standard deviation pixels are divided by.")

    @model_validator(mode="after")
    def _check(self) -> Normalize:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class Augment(Section):
    random_crop_padding: int = Field(2, ge=0, description="Pad by this many pixels, then crop randomly back (0: off).")
    horizontal_flip: bool = Field(True, description="Flip training images left-right with probability 0.5.")
    dsa: bool = Field(
        False,
        description="After the crop and flip, one of differentiable siamese augmentation's transforms per batch "
        "(colour, crop, cutout, flip, scale or rotate; parameters per image): how models are trained on condensed "
        "transfer sets. Data held in memory; the teacher runs online (features.enabled: false).",
    )


class Synthetic(Section):
    num_classes: int = Field(4, ge=2, description="Classes of the synthetic dataset.")
    channels: int = Field(1, ge=1, le=4, description="Image channels.")
    image_size: int = Field(12, ge=4, description="Height and width in pixels.")
    train_size: int = Field(512, ge=8, description="Training images (the validation split is taken from these).")
    test_size: int = Field(128, ge=4, description="Test images.")


class SplitFiles(Section):
    """Where each split's list file (filelist) or shards (webdataset) are, relative to the config."""

    train: str = Field(description="Training data (list file, or brace-expanded shard paths like a-{000..009}.tar).")
    val: str | None = Field(
        None, description="Validation data; null holds out data.val_fraction of train (stable hash of each path/key)."
    )
    test: str = Field(description="Test data (same form as train).")


class ImagenetRecipe(Section):
    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range (fractions of the image)."
    )
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect-ratio range.")
    crop_fraction: float = Field(
        0.875, gt=0, le=1, description="Evaluation: resize the shorter side to image_size / crop_fraction, centre crop."
    )
    auto_augment: Literal["trivialaugment", "randaugment"] | None = Field(
        None, description="Optional TrivialAugmentWide or RandAugment after the crop and flip."
    )

    @model_validator(mode="after")
    def _check(self) -> ImagenetRecipe:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("scale must be 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError("ratio must be 0 < low <= high")
        return self


FILE_DATASETS = ("imagefolder", "filelist", "webdataset")


def looks_like_shards(value: str) -> bool:
    """Whether ``data.unlabeled`` names WebDataset shards (a .tar path, a brace pattern or a ``::`` list)."""
    return value.endswith(".tar") or "{" in value or "::" in value


class DataConfig(Section):
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder", "filelist", "webdataset", "synthetic"] = (
        Field("fashion_mnist", description="Which dataset to use.")
    )
    root: str | None = Field(
        None,
        description="Where the files are. fashion_mnist: then $KDPIPE_DATA, then Debian's dataset-fashion-mnist. "
        "imagefolder: a folder holding train/ and test/ class folders.",
    )
    files: SplitFiles | None = Field(
        None, description="filelist: CSV files of `path,label` or `path,class_name` rows (paths relative to the file)."
    )
    shards: SplitFiles | None = Field(
        None, description="webdataset: tar shards per split (samples hold an image and a `cls` integer label)."
    )
    classes: list[str] | None = Field(
        None, description="webdataset / filelist with integer labels: class names in label order (else class0, ...)."
    )
    download: bool = Field(True, description="Let torchvision download the dataset when it is nowhere on disk.")
    seed: int = Field(0, ge=0, description="Seed of the train/val split and of the training subset.")
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Fraction of the training images held out (seeded) for model selection."
    )
    train_subset: int | None = Field(
        None, gt=0, description="Use only this many training images (seeded choice, after the val split)."
    )
    image_size: int | None = Field(
        None,
        gt=0,
        description="Image datasets: the square size the model sees (the crop size of recipe imagenet); null: the "
        "first training image's size.",
    )
    channels: Literal[1, 3] | None = Field(
        None, description="Image datasets: 1 (grayscale) or 3 (RGB); null: as the first training image is."
    )
    recipe: Literal["cifar", "imagenet"] = Field(
        "cifar",
        description="cifar: pad-crop-flip (data.augment), square resize; imagenet: RandomResizedCrop + flip for "
        "training, resize to image_size / crop_fraction and centre crop for evaluation (streaming only).",
    )
    imagenet: ImagenetRecipe = Field(default_factory=ImagenetRecipe, description="Settings of recipe imagenet.")
    in_memory: Literal["auto"] | bool = Field(
        "auto",
        description="true: decode the whole dataset into one uint8 tensor (fast for small data); false: stream, "
        "decoding per image in loader workers; auto: in memory when the decoded size fits data.memory_budget_mb.",
    )
    memory_budget_mb: int = Field(1024, gt=0, description="auto: the largest decoded dataset held in memory.")
    workers: int | None = Field(
        None, ge=0, description="Streaming: decoding worker processes (null: the usable cores; 0: in the main process)."
    )
    fingerprint: Literal["stat", "content"] = Field(
        "stat",
        description="Cache key of image datasets: stat digests relative paths, sizes and mtimes (fast; a copy that "
        "does not keep mtimes re-runs); content hashes every byte (slow on large data).",
    )
    skip_bad_images: bool = Field(
        False,
        description="Skip unreadable images, missing list entries and empty class folders (counted) "
        "instead of stopping with exit 2.",
    )
    normalize: Normalize | None = Field(None, description="Normalisation; null uses the dataset's own statistics.")
    augment: Augment = Field(default_factory=Augment, description="Training-time augmentation.")
    synthetic: Synthetic = Field(default_factory=Synthetic, description="Settings of the synthetic dataset.")
    transfer_set: str | None = Field(
        None,
        description="A transfer set folder (`kdpipe condense` writes one: <class>/<n>.png and provenance.json) whose "
        "images are the training split instead of the dataset's; val and test stay the dataset's. A provenance.json "
        "in it is checked (every image's sha256) before any stage.",
    )
    transfer_repeats: int = Field(
        1,
        ge=1,
        description="data.transfer_set: passes over its images per epoch, each shuffled and augmented afresh (a "
        "tiny set makes epochs of one step, each followed by a whole validation).",
    )
    unlabeled: str | None = Field(
        None,
        description="Training images without labels, joining the distillation's training set (never val or test): a "
        "folder (every image under it, class folders or not), a list file of image paths (one a line, relative to "
        "it), or WebDataset shards (a .tar path or brace pattern; samples need no `cls`). Loss terms that need a "
        "label use the labelled images only; the teacher's terms use all. Held in memory or streamed as the dataset "
        "is.",
    )
    labels_per_class: int | None = Field(
        None,
        ge=1,
        description="Keep the labels of only this many training images per class (a seeded, class-balanced choice by "
        "data.seed, after the val split); the other training images are treated as unlabelled. For measuring "
        "label scarcity.",
    )

    @field_validator("unlabeled")
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("an empty path; give a folder, a list file or shards, or drop the key")
        return value

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.unlabeled is not None and self.transfer_set is not None:
            raise ValueError("unlabeled joins the dataset's training images, transfer_set replaces them: drop one")
        if self.labels_per_class is not None and self.transfer_set is not None:
            raise ValueError("labels_per_class picks training images of the dataset; with transfer_set the training "
                             "images are the transfer set's: drop one")  # fmt: skip
        if self.labels_per_class is not None and self.dataset == "webdataset":
            raise ValueError("labels_per_class cannot drop labels from WebDataset shards (they come with the "
                             "stream); give the unlabelled samples as shards of their own (unlabeled)")  # fmt: skip
        if self.dataset == "webdataset" and self.unlabeled is not None and not looks_like_shards(self.unlabeled):
            raise ValueError("a webdataset dataset streams its training shards: give the unlabeled images as "
                             "WebDataset shards too (a .tar path or brace pattern)")  # fmt: skip
        if self.dataset == "filelist" and self.files is None:
            raise ValueError("dataset 'filelist' needs `files` (train, test and optionally val list files)")
        if self.dataset == "webdataset" and self.shards is None:
            raise ValueError("dataset 'webdataset' needs `shards` (train, test and optionally val shard paths)")
        if self.dataset not in FILE_DATASETS and self.recipe == "imagenet":
            raise ValueError("recipe 'imagenet' is for image datasets (imagefolder, filelist, webdataset)")
        if self.recipe == "imagenet" and self.in_memory is True:
            raise ValueError("recipe 'imagenet' streams (random resized crops of full images); set in_memory: auto")
        if self.dataset == "webdataset" and self.in_memory is True:
            raise ValueError("webdataset streams; set in_memory: auto or false")
        if self.augment.dsa and (self.dataset == "webdataset" or self.recipe == "imagenet" or self.in_memory is False):
            raise ValueError("augment.dsa transforms batches held in memory; this dataset streams")
        if self.transfer_set is not None:
            if self.train_subset is not None:
                raise ValueError("train_subset picks training images of the dataset; with transfer_set the training "
                                 "images are the transfer set's: drop one")  # fmt: skip
            if self.dataset == "webdataset" or self.recipe == "imagenet" or self.in_memory is False:
                raise ValueError("transfer_set needs the dataset in memory (its val and test images are kept beside "
                                 "the transfer set's); this one streams")  # fmt: skip
        elif self.transfer_repeats != 1:
            raise ValueError("transfer_repeats is for data.transfer_set, which is not set")
        return self


# ------------------------------------------------------------------------------------------- training
class TrainConfig(Section):
    epochs: int = Field(5, gt=0, description="Training epochs.")
    batch_size: int = Field(128, gt=0, description="Images per optimisation step.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimiser.")
    lr: float = Field(0.05, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum (SGD).")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay.")
    schedule: Literal["cosine", "step", "onecycle", "constant"] = Field("cosine", description="Learning-rate schedule.")
    milestones: list[int] = Field(default_factory=list, description="step schedule: epochs at which lr is multiplied.")
    gamma: float = Field(0.1, gt=0, description="step schedule: the factor applied at each milestone.")
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up epochs (cosine and step schedules).")
    pct_start: float = Field(0.3, gt=0, lt=1, description="onecycle: fraction of the steps spent rising to `lr`.")
    div_factor: float = Field(10.0, ge=1, description="onecycle: the first step's learning rate is lr / div_factor.")
    cycle_momentum: bool = Field(
        False,
        description="onecycle: cycle SGD momentum (Adam's beta1) inversely to the learning rate, from `momentum` down "
        "to `base_momentum` at the peak and back (PyTorch's OneCycleLR).",
    )
    base_momentum: float = Field(0.85, ge=0, lt=1, description="onecycle with cycle_momentum: momentum at the peak.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy with the labels.")
    seed: int = Field(0, ge=0, description="Seed of initialisation, shuffling and augmentation.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise ValueError("warmup_epochs must be < epochs")
        if any(m <= 0 for m in self.milestones):
            raise ValueError("milestones must be > 0")
        if self.cycle_momentum and self.base_momentum > self.momentum:
            raise ValueError("base_momentum must be <= momentum (cycle_momentum goes from momentum down to it)")
        return self


# --------------------------------------------------------------------------------------------- stages
class TeacherConfig(Section):
    source: Literal["train", "checkpoint", "torchscript", "torchvision", "python"] = Field(
        "train",
        description="train: `arch` trained by the recipe in `train`; checkpoint: a weights file (`path`) for `arch`; "
        "torchscript: a scripted/traced model file; torchvision: `arch` from torchvision with optional local weights; "
        "python: the model `entrypoint` returns (user code, run as is), with optional weights `path` (without "
        "`path` it is trained by the recipe, like train).",
    )
    arch: str | None = Field(
        "resnet20",
        description="Architecture: a zoo name (`kdpipe models`), torchvision:NAME or timm:NAME (any timm.list_models() "
        "name, built offline with the data's channels and classes).",
    )
    entrypoint: str | None = Field(
        None,
        description="source: python: FILE.py:FUNCTION (the file beside the config) or package.module:FUNCTION, a "
        "function returning an nn.Module. This runs your code. Its source file is part of the cache key.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra constructor arguments for timm:, torchvision: and python: models (e.g. timm's "
        "{patch_size: 4, depth: 2}).",
    )
    path: str | None = Field(
        None,
        description="Weights: a .safetensors file or a PyTorch state_dict file (or the TorchScript file), or "
        "`shipped:NAME`: a teacher shipped with kdpipe (`kdpipe teachers` lists them; source and arch then default to "
        "the shipped one's).",
    )
    allow_pickle: bool = Field(
        False, description="Load `path` with weights_only=False. A pickle is code: only for files you trust."
    )
    preprocessing: str | Normalize | None = Field(
        None,
        description="The normalisation the teacher's weights expect: {mean, std}, or a JSON/YAML sidecar file "
        "holding mean and std (top level or under pretrained_cfg, as timm's config.json has them). Null: timm's "
        "pretrained config for a loaded timm teacher, else the data's. Inputs are re-normalised for the teacher only.",
    )
    check_accuracy: bool = Field(
        True,
        description="Fail before distilling when a teacher loaded from a file scores near chance on the val split "
        "(wrong normalisation, channel order, class order or checkpoint).",
    )
    feature_node: str | None = Field(
        None, description="The fx node whose output is the last feature map; null finds the input of the global pool."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training recipe (source: train).")

    @model_validator(mode="before")
    @classmethod
    def _shipped(cls, data: Any) -> Any:
        """``path: shipped:NAME`` is a checkpoint of the shipped architecture unless the user says otherwise."""
        if not isinstance(data, dict) or not shipped.is_shipped(data.get("path")):
            return data
        try:
            e = shipped.entry(data["path"])
        except ConfigError as exc:
            raise ValueError(f"path: {exc.detail}") from None
        data = {"source": "checkpoint", "arch": e["arch"], **data}
        if data["source"] != "checkpoint":
            raise ValueError(f"a shipped teacher is a checkpoint, not source '{data['source']}'")
        if data["arch"] != e["arch"]:
            raise ValueError(f"shipped teacher {data['path']} is a {e['arch']}, not {data['arch']}; drop `arch`")
        return data

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if self.source in ("checkpoint", "torchscript") and not self.path:
            raise ValueError(f"source '{self.source}' needs `path`")
        if self.source == "python" and not self.entrypoint:
            raise ValueError("source 'python' needs `entrypoint` (FILE.py:FUNCTION or package.module:FUNCTION)")
        if self.source not in ("torchscript", "python") and not self.arch:
            raise ValueError(f"source '{self.source}' needs `arch`")
        return self

    @property
    def trains(self) -> bool:
        """Whether the teacher stage trains this teacher (by the recipe) rather than loading it."""
        return self.source == "train" or (self.source == "python" and not self.path)


#: the name of the one teacher of a run with ``teacher:``, and of the ensemble in reports and gates with ``teachers:``
TEACHER = "teacher"


def stage_instance(stage: str, teacher: str | None) -> str:
    """The name of a stage's work for one of several teachers (``teacher:r20``), or the stage's own name. Such
    instances' cache entries live in their stage's folder (``teacher/KEY``): the key tells them apart."""
    return f"{stage}:{teacher}" if teacher else stage


def stage_of(name: str) -> str:
    """The stage (its cache folder) of a stage or stage instance name: ``teacher:r20`` → ``teacher``."""
    return name.partition(":")[0]


class TeacherMember(TeacherConfig):
    """One of several teachers (`teachers`): everything a teacher has, plus its name and its weight."""

    name: str = Field(
        description="The teacher's name: its entry in the report, the model a gate names, and its stage instances "
        "(`teacher:NAME`, `features:NAME`). Letters, digits, `_` and `-`; not `teacher` (the ensemble) or `student`.",
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Its weight in the ensemble's average (of logits; of softened probabilities for method kd), "
        "normalised over the teachers.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", value):
            raise ValueError(f"'{value}': use letters, digits, _ and - (it names a report entry and a gate's model)")
        if value in (TEACHER, "student") or value.startswith("student-"):
            raise ValueError(f"'{value}' is reserved ('teacher' is the ensemble, 'student' and 'student-*' the "
                             "student and its variants); choose another name")  # fmt: skip
        return value


class FeaturesConfig(Section):
    enabled: bool = Field(
        False,
        description="Compute the frozen teacher's feature maps and logits once (a cached artifact) instead of a "
        "teacher forward pass at every distillation step.",
    )
    views: int = Field(4, ge=1, description="Augmented views precomputed per training image (view 0 is unaugmented).")
    precision: Literal["fp16", "fp32"] = Field("fp16", description="Storage precision of the cached feature maps.")
    batch_size: int = Field(512, gt=0, description="Teacher batch size while computing features.")
    seed: int = Field(0, ge=0, description="Seed of the views' crop and flip parameters.")
    max_bytes: int | None = Field(
        None,
        gt=0,
        description="Largest features cache (views x images x C x H x W x bytes, plus logits) to write; null: the "
        "free disk space minus 1 GiB. Checked before computing.",
    )


# = DISTILLERS' names (a test keeps them equal)
DistillMethod = Literal["simkd", "kd", "fitnet", "scratch", "crd", "crd_kd", "dkd", "zipf_ls"]
Variant = Literal[
    "optimized", "fp16", "int8_dynamic", "int8_static", "int8_fallback", "qad_int8"
]  # = exporters.variants.VARIANTS' names


class KDConfig(Section):
    temperature: float = Field(
        4.0, gt=0, description="Temperature T softening teacher and student logits; the KL term is scaled by T²."
    )
    alpha: float = Field(
        0.9, ge=0, le=1, description="Weight of the KL term; the cross-entropy with the labels gets 1 - alpha."
    )


class FitNetConfig(Section):
    beta: float = Field(
        100.0, ge=0, description="Weight of the hint loss (MSE of the regressed student map vs the teacher map)."
    )


class SimKDConfig(Section):
    """SimKD's loss is the paper's MSE alone unless a preset or a weight adds a term through the reused head."""

    preset: Literal["paper", "short"] = Field(
        "paper",
        description="paper: the paper's loss exactly (feature MSE alone). short: settings measured to make the "
        "reused-classifier student learn faster at short budgets (a few epochs): the terms below at the values "
        "`kdpipe` documents for it (docs/methods.md); any weight set here overrides the preset's.",
    )
    ce_weight: float | None = Field(
        None,
        ge=0,
        description="Weight of a cross-entropy with the labels on the logits of the reused (frozen) teacher head; "
        "null: the preset's value (paper 0).",
    )
    kd_weight: float | None = Field(
        None,
        ge=0,
        description="Weight of a KL term between the teacher's logits and the student's logits through the same "
        "frozen head, at `temperature` and scaled by T²; null: the preset's value (paper 0).",
    )
    temperature: float = Field(4.0, gt=0, description="Temperature of the kd_weight term.")

    def weights(self) -> tuple[float, float]:
        """(ce_weight, kd_weight) after the preset."""
        ce, kd = SIMKD_PRESETS[self.preset]
        return (ce if self.ce_weight is None else self.ce_weight, kd if self.kd_weight is None else self.kd_weight)


#: (ce_weight, kd_weight) of each SimKD preset
SIMKD_PRESETS: dict[str, tuple[float, float]] = {"paper": (0.0, 0.0), "short": (1.0, 1.0)}


class CRDConfig(Section):
    """CRD (Tian et al., ICLR 2020); defaults are the paper's."""

    embed_dim: int = Field(
        128, ge=1, description="Size of the two embeddings (a linear map of the pooled last features, L2-normalised)."
    )
    negatives: int = Field(
        16384,
        gt=0,
        description="Negatives drawn per image from the memory (uniformly among the other training images); must be "
        "below the training split's size.",
    )
    temperature: float = Field(0.07, gt=0, description="Temperature of the contrastive (NCE) scores.")
    momentum: float = Field(
        0.5, ge=0, lt=1, description="Memory update: row = normalise(momentum * row + (1 - momentum) * embedding)."
    )
    beta: float = Field(0.8, ge=0, description="Weight of the CRD term; the cross-entropy with the labels gets 1.")
    kd_weight: float = Field(
        1.0,
        ge=0,
        description="crd_kd only: weight of KD's soft term T²·KL(teacher ‖ student) at kd_temperature.",
    )
    kd_temperature: float = Field(4.0, gt=0, description="crd_kd only: temperature T of KD's soft term.")


class DKDConfig(Section):
    """DKD (Zhao et al., CVPR 2022); defaults are the paper's CIFAR-100 ones."""

    alpha: float = Field(1.0, ge=0, description="Weight of TCKD, the target-vs-rest (binary) KL term.")
    beta: float = Field(8.0, ge=0, description="Weight of NCKD, the KL among the non-target classes.")
    temperature: float = Field(4.0, gt=0, description="Temperature of both terms; they are scaled by T².")
    warmup: int | None = Field(
        None,
        ge=0,
        description="Epochs over which the distillation terms ramp up linearly (weight min(1, epoch / warmup), epoch "
        "counted from 1); 0: full weight from the start; null: the paper's share of the schedule (20 of 240 "
        "epochs: distill.train.epochs / 12, rounded). At most distill.train.epochs.",
    )

    def warmup_epochs(self, epochs: int) -> int:
        """The warm-up in epochs for a schedule of ``epochs``."""
        return round(epochs * 20 / 240) if self.warmup is None else self.warmup


class ZipfConfig(Section):
    """Zipf's label smoothing (Liang et al., ECCV 2022); defaults are the authors' CIFAR recipe."""

    weight: float = Field(
        0.1, ge=0, description="Weight of the KL between the Zipf target and the student's non-target distribution."
    )
    power: float = Field(1.0, gt=0, description="Zipf exponent: the target of the class ranked r is ∝ 1 / r^power.")
    rank: Literal["dense", "logits"] = Field(
        "dense",
        description="What ranks the classes: dense, votes of the classifier applied at every position of the "
        "student's last feature map (the paper's); logits, the student's own logits.",
    )
    only_correct: bool = Field(
        False, description="Apply the Zipf term only to images the student already classifies correctly."
    )


class DataFreeConfig(Section):
    """``distill.data: synthetic``: the generator trained against the frozen teacher, and its loss terms."""

    z_dim: int = Field(128, ge=1, description="Length of the generator's noise vector z.")
    width: int = Field(
        64, ge=4, description="Generator channels: 2 x width after the linear layer, width in the last block."
    )
    conditional: bool = Field(
        True,
        description="Class-conditional generator: each image is generated for a target class (balanced over the "
        "batch) and ce pulls the teacher towards it; false: unconditional, ce on the teacher's own argmax (DAFL).",
    )
    batch_size: int = Field(64, gt=1, description="Images per generator step.")
    steps_per_epoch: int = Field(
        100, gt=0, description="Student steps (of distill.train.batch_size images) per epoch; epochs: distill.train."
    )
    generator_every: int = Field(
        2, ge=1, description="One generator step before every n-th student step (1: before each one)."
    )
    extra_images: int = Field(
        96,
        ge=0,
        description="Images added to the pool after each generator step by the updated generator without gradients "
        "(a teacher forward pass each, about 6x cheaper per image than the step's forward and backward pass).",
    )
    pool_size: int = Field(
        4096,
        ge=2,
        description="The student's batches are drawn from the most recent this many generated images, kept as "
        "uint8 like real images.",
    )
    replay: Literal["stored", "online"] = Field(
        "stored",
        description="stored: student batches are pool images as generated, with the teacher's logits stored when they "
        "were generated (no second teacher pass; methods that need only logits: kd, dkd; the others run online); "
        "online: data.augment's crop and flip on pool images and the teacher run on every student batch.",
    )
    lr: float = Field(1e-3, gt=0, description="Generator learning rate (Adam, betas 0.5 and 0.999, constant).")
    bn: float = Field(
        1.0,
        ge=0,
        description="Weight of the batch-norm statistics term (DeepInversion): the mean over the teacher's BN layers "
        "of ||mean(x) - running_mean|| + ||var(x) - running_var|| of each layer's input. A teacher without BN "
        "layers (or a TorchScript one) leaves it out when it is not set; set explicitly, it is refused.",
    )
    ce: float = Field(
        1.0,
        ge=0,
        description="Weight of the cross-entropy of the teacher's logits with the target (one-hot, or mixed: `mix`).",
    )
    mix: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Conditional generator: the share of images generated for a mixed target (weight 0.5-1 on their "
        "class, the rest on another class drawn at random): images between classes. Measured once on Fashion-MNIST, "
        "0.5 did worse than 0 (46.6% against 58.0% after 400 steps).",
    )
    entropy: float = Field(
        5.0,
        ge=0,
        description="Weight of the information-entropy term (DAFL): log K - H(mean softmax of the batch), 0 when "
        "the batch's mean prediction is uniform over the K classes.",
    )
    diversity: float = Field(
        0.05,
        ge=0,
        description="Weight of the mode-seeking term (Mao et al. 2019) within a class: mean over pairs of images of "
        "the same target class of mean|z_i - z_j| / (mean|x_i - x_j| + 0.01), large when different noise gives the "
        "same image (without it the generator settles on one image per class).",
    )
    adversarial: float = Field(
        1.0,
        ge=0,
        description="Weight of the adversarial term (DFAD): minus the mean L1 distance between student and teacher "
        "logits, so the generator seeks images where they disagree.",
    )
    adversarial_ramp: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Curriculum (CuDFKD, easy to hard): the adversarial weight rises linearly from 0 to "
        "`adversarial` over this fraction of the training steps (0: full weight from the start).",
    )
    easy_only: bool = Field(
        True,
        description="Curriculum per image: the adversarial term pushes only images the student still classifies "
        "like the teacher (easy ones) towards disagreement; images already hard are left where they are.",
    )
    collapse_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Collapse: an epoch in which one class takes more than this share of the generated images (the "
        "teacher's argmax) is reported and warned about.",
    )
    collapse_entropy: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Collapse: an epoch whose generated class histogram has an entropy below this fraction of "
        "log K is reported and warned about.",
    )
    samples: int = Field(
        256,
        ge=1,
        description="Generated images saved in the distill entry (uint8 .npy): int8 calibration and the report's "
        "grid use them, since no training image may be read.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataFreeConfig:
        if not (self.bn or self.ce or self.entropy):
            raise ValueError("bn, ce and entropy are all 0: the generator would only chase disagreement; give one "
                             "of them a weight")  # fmt: skip
        if self.samples > self.pool_size:
            raise ValueError("samples must be <= pool_size (the saved samples are the pool's last images)")
        return self


class DistillConfig(Section):
    method: DistillMethod = Field(
        "simkd",
        description="Distillation method of the deployed student: simkd (reused teacher classifier), kd (Hinton), "
        "fitnet (feature hints) or scratch (labels only, no teacher).",
    )
    compare: list[DistillMethod] = Field(
        default_factory=list,
        description="Also train these methods with the same student, recipe and seed and compare validation and "
        "test top-1 (report key `comparison`); only `method`'s student is deployed.",
    )
    student: str = Field(
        "resnet8",
        description="Student architecture: a zoo name, torchvision:NAME, timm:NAME, or python:FILE.py:FUNCTION / "
        "python:package.module:FUNCTION (user code, run as is).",
    )
    student_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra constructor arguments of a timm:, torchvision: or python: student."
    )
    require_smaller: bool = Field(
        False,
        description="Fail before training when the deployable student (for SimKD: student body + projector + the "
        "teacher's head) has no fewer parameters than the teacher; false only warns.",
    )
    factor: int = Field(2, ge=1, description="SimKD projector bottleneck factor f (C_t / f hidden channels).")
    student_feature_node: str | None = Field(None, description="Override of the student's last-feature-map node.")
    simkd: SimKDConfig = Field(
        default_factory=SimKDConfig, description="Settings of method simkd (used when simkd is trained)."
    )
    kd: KDConfig = Field(default_factory=KDConfig, description="Settings of method kd (used when kd is trained).")
    fitnet: FitNetConfig = Field(
        default_factory=FitNetConfig, description="Settings of method fitnet (used when fitnet is trained)."
    )
    crd: CRDConfig = Field(
        default_factory=CRDConfig, description="Settings of methods crd and crd_kd (used when either is trained)."
    )
    dkd: DKDConfig = Field(default_factory=DKDConfig, description="Settings of method dkd (used when dkd is trained).")
    zipf: ZipfConfig = Field(
        default_factory=ZipfConfig, description="Settings of method zipf_ls (used when zipf_ls is trained)."
    )
    data: Literal["real", "synthetic"] = Field(
        "real",
        description="Where the student's training images come from: real (the training split) or synthetic (a "
        "generator trained against the frozen teacher, settings in `datafree`: no training image is read; "
        "validation images still choose the epoch).",
    )
    datafree: DataFreeConfig = Field(
        default_factory=DataFreeConfig, description="The generator of data: synthetic (used only then)."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training recipe of the student.")

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        repeated = sorted({m for m in self.compare if self.compare.count(m) > 1})
        if repeated:
            raise ValueError(f"compare lists '{repeated[0]}' more than once")
        return self


class ValidateConfig(Section):
    batch_size: int = Field(256, gt=0, description="Evaluation batch size.")


class ParityConfig(Section):
    samples: int = Field(512, gt=0, description="Test images compared between ONNX Runtime and PyTorch.")
    max_abs_diff: float = Field(1e-4, gt=0, description="Largest allowed absolute logit difference.")
    min_top1_agreement: float = Field(0.999, ge=0, le=1, description="Smallest allowed top-1 agreement.")


class QADConfig(Section):
    epochs: int = Field(2, gt=0, description="qad_int8: fine-tuning epochs under fake quantisation.")
    lr: float = Field(0.002, gt=0, description="qad_int8: peak learning rate (SGD, cosine); far below distill's.")
    batch_size: int = Field(128, gt=0, description="qad_int8: images per step.")
    weight_decay: float = Field(5e-5, ge=0, description="qad_int8: weight decay.")
    seed: int = Field(0, description="qad_int8: seed of shuffling and augmentation.")


class QuantizationConfig(Section):
    calibration_samples: int = Field(
        256, gt=0, description="Training images (not test) that calibrate int8_static, int8_fallback and qad_int8."
    )
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="Calibration method.")
    per_channel: bool = Field(True, description="Per-channel weight quantisation.")
    accuracy_budget: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="int8_fallback: largest val top-1 loss against fp32; nodes stay in fp32 a step at a time "
        "(greedily, the node or block of neighbouring nodes that gives the most back) until the int8 model is "
        "within it.",
    )
    sensitivity_samples: int = Field(
        2000, gt=0, description="int8_fallback: validation images (never test) the per-node sensitivity is measured on."
    )
    max_fallback_nodes: int = Field(
        24, ge=1, description="int8_fallback: give up after leaving this many nodes in fp32 (then the best step wins)."
    )
    fallback_candidates: int = Field(
        32,
        ge=1,
        description="int8_fallback: each greedy step tries this many of the most sensitive nodes (a step costs one "
        "quantisation and one validation pass per candidate).",
    )
    qad: QADConfig = Field(default_factory=QADConfig, description="qad_int8 (quantisation-aware distillation).")


class ExportConfig(Section):
    opset: int = Field(18, ge=13, le=23, description="ONNX opset version.")
    exporter: Literal["dynamo", "torchscript"] = Field("dynamo", description="torch.onnx exporter.")
    teacher: bool = Field(True, description="Also export the teacher, for comparison.")
    parity: ParityConfig = Field(default_factory=ParityConfig, description="ONNX Runtime vs PyTorch tolerances.")
    variants: list[Variant] = Field(
        default_factory=list,
        description="Deployment variants of the student, each re-validated on the test split: ONNX Runtime "
        "graph-optimised fp32, fp16 (fp16 weights; ORT's CPU provider computes it in fp32), int8 dynamic, int8 static "
        "(QDQ, calibrated), int8_fallback (static int8 with the most sensitive nodes in fp32 within "
        "quantization.accuracy_budget), qad_int8 (static int8 of the student fine-tuned with quantisation-aware "
        "distillation).",
    )
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="int8_static, int8_fallback and qad_int8 settings."
    )
    bundle_samples: int = Field(
        64, ge=0, description="Test images saved with expected logits (samples.npz) for on-device parity checks."
    )


def _count_or_list(schema: dict[str, Any]) -> None:
    """JSON Schema of a field whose validator also takes one count for a list of one."""
    items = dict(schema)
    for key in ("title", "description", "default"):
        items.pop(key, None)
    for key in list(schema):
        if key not in ("title", "description", "default"):
            del schema[key]
    schema["anyOf"] = [items["items"], items]


class BenchmarkConfig(Section):
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers to measure, each on its own; the first is the headline. "
        "'available' means every provider this onnxruntime offers.",
    )
    intra_op_threads: list[int] = Field(
        default_factory=lambda: [1],
        description="ONNX Runtime intra-op thread counts (a count or a list); the first is the headline.",
        json_schema_extra=_count_or_list,
    )
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], description="Batch sizes to time.")
    warmup: int = Field(10, ge=0, description="Untimed runs first.")
    min_runs: int = Field(50, ge=1, description="Time at least this many runs…")
    min_seconds: float = Field(1.0, ge=0, description="…and for at least this long.")
    max_seconds: float = Field(20.0, gt=0, description="Stop after this long whatever the count.")
    rounds: int = Field(10, ge=1, description="Measurement rounds (the samples of noise-aware baseline comparisons).")
    pytorch_reference: bool = Field(True, description="Also time PyTorch eager teacher and student, as a reference.")

    @model_validator(mode="after")
    def _check(self) -> BenchmarkConfig:
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise ValueError("batch_sizes must be a non-empty list of sizes > 0")
        if not self.providers:
            raise ValueError("providers must not be empty")
        if not self.intra_op_threads or any(t <= 0 for t in self.intra_op_threads):
            raise ValueError("intra_op_threads must be a non-empty list of counts > 0")
        return self

    @field_validator("intra_op_threads", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v


GateMetric = Literal[
    "top1", "top5", "agreement_with_teacher", "top1_drop_vs_teacher", "top1_relative_drop_vs_teacher",
    "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "throughput_ips", "speedup_p50",
    "file_bytes", "parameters", "parity_max_abs_diff", "parity_top1_agreement",
]  # fmt: skip
LATENCY_METRICS = {"mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "throughput_ips", "speedup_p50"}


class GateConfig(Section):
    metric: GateMetric = Field(description="The figure checked (accuracy, *_drop_vs_teacher, latency, size, parity).")
    model: str = Field("student", description="Which model of the report: teacher, student or an exported variant.")
    batch_size: int | None = Field(None, gt=0, description="Latency metrics: the benchmarked batch size.")
    threads: int | None = Field(None, gt=0, description="Latency metrics: the intra-op threads it must be measured at.")
    min: float | None = Field(None, description="Pass when measured >= min.")
    max: float | None = Field(None, description="Pass when measured <= max.")

    @model_validator(mode="after")
    def _check(self) -> GateConfig:
        if (self.min is None) == (self.max is None):
            raise ValueError("give exactly one of min or max")
        if self.metric in LATENCY_METRICS and self.batch_size is None:
            raise ValueError(f"latency metric '{self.metric}' needs batch_size")
        return self


class BaselineConfig(Section):
    models: list[str] = Field(default_factory=lambda: ["student"], description="Models compared with the baseline.")
    max_top1_drop: float | None = Field(0.005, ge=0, description="Largest allowed test top-1 drop (absolute).")
    max_latency_regression_pct: float | None = Field(
        10.0, ge=0, description="Largest allowed p50 slowdown in percent, judged on the confidence interval."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence of the bootstrap interval of the ratio.")


class RuntimeConfig(Section):
    """Settings that do not change results: never part of a cache key."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where PyTorch trains (auto: cuda if present).")
    threads: int | None = Field(None, gt=0, description="torch.set_num_threads for training; null keeps the default.")
    progress: bool = Field(True, description="Show progress bars.")
    channels_last: bool = Field(
        True, description="Train in channels_last memory format (25-33% faster convolutions on this project's CPUs)."
    )
    amp: bool = Field(
        False,
        description="Mixed precision: bf16 autocast on CPU, fp16 autocast with a gradient scaler on CUDA. Off by "
        "default: measured no faster for resnet8 and 7.8x slower for resnet20 on this project's CPUs.",
    )
    compile: bool = Field(
        False, description="torch.compile the trained model. Off by default: 36 s to compile, no faster on CPU here."
    )
    nproc: int = Field(
        1,
        ge=1,
        description="Data-parallel training processes forked on this machine (gloo, CPU; on GPUs launch with "
        "torchrun instead). Each takes train.batch_size images of every global batch and the learning rate is scaled "
        "by nproc; part of the training stages' cache keys when > 1.",
    )


class PipelineConfig(Section):
    cache_dir: str = Field(".kdpipe", description="Cache folder, relative to the config file.")
    output_dir: str = Field("kdpipe-out", description="Where report.json and the run's model files are written.")
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="The dataset, its splits, loading (in memory or streamed) and augmentation.",
    )
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="The teacher stage: which teacher, and how it is trained or loaded."
    )
    teachers: list[TeacherMember] | None = Field(
        None,
        description="Several teachers instead of `teacher` (an ensemble, at least two): each is trained or loaded and "
        "cached on its own, and the student learns from all of them (docs/teachers.md, 'Several teachers').",
    )
    features: FeaturesConfig = Field(
        default_factory=FeaturesConfig,
        description="The features stage: the frozen teacher's feature maps and logits, computed once and cached.",
    )
    distill: DistillConfig = Field(
        default_factory=DistillConfig, description="The distill stage: the student, the method and its training recipe."
    )
    validate_: ValidateConfig = Field(
        default_factory=ValidateConfig,
        alias="validate",
        description="The validate stage: teacher and student accuracy on the test split.",
    )
    export: ExportConfig = Field(
        default_factory=ExportConfig, description="The export stage: ONNX files, their parity and deployment variants."
    )
    benchmark: BenchmarkConfig = Field(
        default_factory=BenchmarkConfig, description="The benchmark stage: ONNX Runtime latency, throughput and memory."
    )
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Result-neutral runtime settings.")
    gates: list[GateConfig] = Field(default_factory=list, description="Hard checks; any failure makes the exit code 1.")
    baseline: BaselineConfig = Field(
        default_factory=BaselineConfig, description="Limits used by `--baseline REPORT` regression checks."
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _dsa_needs_the_teacher_online(self) -> PipelineConfig:
        """Cached teacher features are computed on crops and flips only: a DSA-transformed batch has none."""
        if self.data.augment.dsa and self.features.enabled:
            raise ValueError("data.augment.dsa: cached teacher features cannot follow its transforms; set "
                             "features.enabled: false (the teacher then runs on every augmented batch)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _shipped_teacher_fits_the_data(self) -> PipelineConfig:
        """A shipped teacher knows one dataset; on another one it would silently be a bad teacher."""
        for key, teacher in self.teacher_keys():
            if shipped.is_shipped(teacher.path):
                trained_on = shipped.entry(teacher.path)["dataset"]
                if trained_on != self.data.dataset:
                    raise ValueError(f"{key}.path: {teacher.path} was trained on {trained_on}, "
                                     f"data.dataset is {self.data.dataset}")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _one_ensemble(self) -> PipelineConfig:
        """``teacher`` or ``teachers``, never both; at least two teachers, each named once; shipped teachers made for
        the same classes and images."""
        if self.teachers is None:
            return self
        if "teacher" in self.model_fields_set:
            raise ValueError("teacher and teachers are both given: `teacher` is one teacher, `teachers` a list of "
                             "several; keep one")  # fmt: skip
        if len(self.teachers) < 2:
            raise ValueError("teachers: lists one teacher; one teacher is `teacher:` (teachers is for two or more)")
        first: dict[str, int] = {}
        for i, member in enumerate(self.teachers):
            if member.name in first:
                raise ValueError(f"teachers.{i}.name: '{member.name}' is also teachers.{first[member.name]}'s name; "
                                 "each teacher needs its own")  # fmt: skip
            first[member.name] = i
        made = [(f"teachers.{i}", shipped.entry(m.path)) for i, m in enumerate(self.teachers)
                if shipped.is_shipped(m.path)]  # fmt: skip
        for key, e in made[1:]:
            e0 = made[0][1]
            for what, a, b in (("classes", len(e0["classes"]), len(e["classes"])),
                               ("input shape", e0["input_shape"], e["input_shape"])):  # fmt: skip
                if a != b:
                    raise ValueError(f"{key}.path: {e0.get('file')} and {e.get('file')} were made for another {what} "
                                     f"({a} vs {b}); an ensemble's teachers classify the same images")  # fmt: skip
        return self

    def teacher_keys(self) -> list[tuple[str, TeacherConfig]]:
        """(config key, teacher) of every teacher: ``[("teacher", teacher)]``, or ``teachers.0``, ``teachers.1``, …"""
        if self.teachers is None:
            return [(TEACHER, self.teacher)]
        return [(f"teachers.{i}", member) for i, member in enumerate(self.teachers)]

    @model_validator(mode="after")
    def _unlabeled_images_need_real_data(self) -> PipelineConfig:
        """Data-free distillation reads no training image: unlabelled ones would be ignored without a word."""
        data = self.data
        if self.distill.data == "synthetic" and (data.unlabeled is not None or data.labels_per_class is not None):
            key = "unlabeled" if data.unlabeled is not None else "labels_per_class"
            raise ValueError(f"data.{key}: distill.data: synthetic trains on generated images only; drop one")
        return self


class LoadedConfig:
    """A validated config plus where it came from (relative paths resolve against its folder)."""

    def __init__(self, config: PipelineConfig, path: Path | None) -> None:
        self.config = config
        self.path = path
        self.base = path.parent if path else Path.cwd()
        #: what is derived once per loaded config from the files it names (the image file listing), so the
        #: fingerprint, the streaming decision and the loading of one run see the same files, walked once
        self.memo: dict[str, Any] = {}
        #: (config key, name) of the teacher a :meth:`for_teacher` view is of (``("teachers.1", "r20")``), else None
        self.member: tuple[str, str] | None = None
        self._views: dict[str, LoadedConfig] = {}

    @property
    def several_teachers(self) -> bool:
        """Whether the config lists several teachers (``teachers``) rather than one (``teacher``)."""
        return self.config.teachers is not None

    @property
    def teacher_names(self) -> list[str]:
        """The teachers' names in config order: ``["teacher"]`` for one teacher, else each one's ``name``."""
        return [m.name for m in self.config.teachers] if self.config.teachers else [TEACHER]

    @property
    def teacher_weights(self) -> list[float]:
        """Each teacher's weight in the ensemble's average, normalised to sum to 1 (``[1.0]`` for one teacher)."""
        weights = [m.weight for m in self.config.teachers] if self.config.teachers else [1.0]
        return [w / sum(weights) for w in weights]

    def teacher_key(self, name: str) -> str:
        """The config key of teacher ``name``: ``teacher``, or ``teachers.I`` of one of several."""
        return f"teachers.{self.teacher_names.index(name)}" if self.config.teachers else TEACHER

    def for_teacher(self, name: str) -> LoadedConfig:
        """The config as the work of teacher ``name`` sees it: a single-teacher config whose ``teacher`` is that
        one (without name and weight). Its teacher and features stages then have exactly the keys a single-teacher
        run of the same teacher has, so changing one teacher re-runs only its own work and a teacher trained alone
        is reused by an ensemble. The config itself for a single teacher."""
        if self.config.teachers is None:
            return self
        if name not in self._views:
            i = self.teacher_names.index(name)
            member = self.config.teachers[i]
            plain = TeacherConfig.model_validate(member.model_dump(exclude={"name", "weight"}))
            view = LoadedConfig(self.config.model_copy(update={"teacher": plain, "teachers": None}), self.path)
            view.base, view.memo, view.member = self.base, self.memo, (f"teachers.{i}", name)
            self._views[name] = view
        return self._views[name]

    @contextmanager
    def member_errors(self) -> Iterator[None]:
        """In a :meth:`for_teacher` view, errors naming ``teacher.KEY`` name the teacher's own key instead
        (``teachers.1.KEY``): the view is a single-teacher config, the user's file lists several."""
        try:
            yield
        except ConfigError as exc:
            if self.member is None or not (exc.key == TEACHER or exc.key.startswith(f"{TEACHER}.")):
                raise
            raise ConfigError(self.member[0] + exc.key[len(TEACHER) :], exc.detail, exc.source) from None
        except UsageError as exc:
            text = str(exc)
            if self.member is None or isinstance(exc, ConfigError) or not text.startswith(f"{TEACHER}."):
                raise
            raise UsageError(self.member[0] + text[len(TEACHER) :]) from None

    @property
    def source(self) -> str:
        return self.path.name if self.path else "<config>"

    def resolve(self, value: str) -> Path:
        if shipped.is_shipped(value):  # a teacher shipped inside the package
            return shipped.shipped_path(value, source=self.source)
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p)

    @property
    def cache_dir(self) -> Path:
        return self.resolve(self.config.cache_dir)

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.config.output_dir)

    @property
    def data_parallel_processes(self) -> int:
        """Processes that train together: torchrun's WORLD_SIZE when it started this one, else runtime.nproc."""
        launched = launched_world_size()
        return launched if launched > 1 else self.config.runtime.nproc

    def section(self, name: str) -> dict[str, Any]:
        """A config section as plain JSON data (what goes into a cache key).

        ``data.workers`` is left out: streamed batches do not depend on how many processes decode them."""
        section = getattr(self.config, "validate_" if name == "validate" else name).model_dump(mode="json")
        if name == "data":
            section.pop("workers", None)
        for path, neutral in KEY_NEUTRAL.get(name, {}).items():
            *parents, key = path.split(".")
            holder = section
            for part in parents:
                holder = holder.get(part) or {}
            if key in holder and holder[key] == neutral:
                del holder[key]  # at the value that means "not used": keys of runs from before it existed stay valid
        return section


#: Settings added after cache entries existed, per section, with the value that leaves results as they were: at
#: that value they stay out of the cache key, so adding a setting never re-runs anyone's cached stages.
KEY_NEUTRAL: dict[str, dict[str, Any]] = {
    "data": {
        "unlabeled": None,
        "labels_per_class": None,
        "transfer_set": None,
        "transfer_repeats": 1,
        "augment.dsa": False,
    },
}


def _describe(err: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
    key = ".".join(loc)
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
        return key, f"unknown key{hint}"
    messages = {
        "greater_than": lambda: f"must be > {ctx.get('gt')}",
        "greater_than_equal": lambda: f"must be >= {ctx.get('ge')}",
        "less_than": lambda: f"must be < {ctx.get('lt')}",
        "less_than_equal": lambda: f"must be <= {ctx.get('le')}",
        "literal_error": lambda: f"must be one of {ctx.get('expected')}, got {err.get('input')!r}",
        "missing": lambda: "is required",
        "int_parsing": lambda: f"must be an integer, got {err.get('input')!r}",
        "int_from_float": lambda: f"must be an integer, got {err.get('input')!r}",
        "float_parsing": lambda: f"must be a number, got {err.get('input')!r}",
        "finite_number": lambda: f"must be a finite number, got {err.get('input')!r}",
        "bool_parsing": lambda: f"must be true or false, got {err.get('input')!r}",
        "string_type": lambda: f"must be a string, got {err.get('input')!r}",
        "list_type": lambda: f"must be a list, got {err.get('input')!r}",
        "model_type": lambda: f"must be a mapping, got {err.get('input')!r}",
        "dict_type": lambda: f"must be a mapping, got {err.get('input')!r}",
    }
    if kind in messages:
        return key, messages[kind]()
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return key, msg


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(f.alias or n for n, f in model.model_fields.items())


def parse_config(data: Any, source: str | None = None) -> PipelineConfig:
    """Validate plain data (as YAML gives it) into a :class:`PipelineConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"the top level must be a mapping, got {type(data).__name__}", source)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        key, msg = first_error(exc, PipelineConfig)
        raise ConfigError(key, msg, source) from None


def first_error(exc: ValidationError, model: type[BaseModel]) -> tuple[str, str]:
    """(key path, message) of a validation error's first problem, saying how many more there are."""
    errors = exc.errors()
    key, msg = _describe(errors[0], model)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return key, msg + more


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> LoadedConfig:
    """Load and validate a YAML config file (``None``: the defaults), with ``key.path=value`` overrides.

    The YAML is read strictly (:mod:`kdpipe.yamlfile`): a duplicated key, bytes that are not UTF-8 or a
    syntax error is one ConfigError naming the file, like a wrong value.
    """
    if path is None:
        return LoadedConfig(parse_config(apply_overrides({}, list(overrides)), "--set"), None)
    path = Path(path)
    data = load_yaml_file(path)
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, list(overrides))
    elif overrides and data is None:
        data = apply_overrides({}, list(overrides))
    return LoadedConfig(parse_config(data, path.name), path.resolve())


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as strict YAML) to raw config data (a copy: a mapping that
    YAML shares between places, through an anchor and its aliases, is changed in the one place named)."""
    data = _unshared(data) if overrides else data
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p.strip() for p in parts):
            raise ConfigError("", f"--set '{item}' must look like key.path=value, e.g. distill.train.epochs=3")
        value = load_yaml(raw, f"--set {key}")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):  # an item of a list by its index: teachers.1.train.lr=0.2
                node = node[_index(node, part, key, ".".join(parts[:depth]))]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, dict | list):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(key, f"cannot set a key below {where}, which is not a mapping", "--set")
        if isinstance(node, list):
            node[_index(node, parts[-1], key, ".".join(parts[:-1]))] = value
        else:
            node[parts[-1]] = value
    return data


def _unshared(node: Any) -> Any:
    """A copy of YAML data in which no mapping or list appears twice (``copy.deepcopy`` would keep aliases shared)."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def _index(items: list[Any], part: str, key: str, where: str) -> int:
    """``part`` as an index of the list at ``where`` (an override's key path), or a ConfigError saying which exist."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(key, f"{where} is a list of {len(items)}: give an index from 0 to {len(items) - 1}", "--set")
    return int(part)
