"""CRD (Tian et al., ICLR 2020, "Contrastive Representation Distillation"), and CRD+KD.

Both networks' last feature maps are average-pooled and embedded: ``v = normalise(W·pool(f))``, one linear map per
side (``embed_dim``, 128). A contrastive critic tells the teacher embedding of the same image (the positive) from
those of ``K`` other training images (the negatives, ``negatives``: 16,384 in the paper), which lower-bounds the
mutual information between the two representations. With ``M`` training images and temperature τ (0.07):

``P(v, u) = exp(v·u / τ) / Z``, ``h(v, u) = P / (P + K / M)`` (the probability that the pair is the positive),

``L_NCE(v; U) = -log h(v, u⁺) - Σ_k log(1 - h(v, u_k⁻))``, averaged over the batch. ``Z`` is estimated once, on
the first batch, as ``M · mean(exp(v·u / τ))`` (the memory-bank NCE of Wu et al. that CRD builds on) and then fixed.

The positives and negatives come from a memory per side holding one embedding per training image (rows by the
image's index in the training split, ``Batch.index``): the student anchor reads the teacher memory and the teacher
anchor the student memory, so ``CRD = L_NCE(v_s; teacher memory) + L_NCE(v_t; student memory)``. Negatives are
drawn uniformly among the other training images. Each step first updates this batch's rows,
``row = normalise(momentum·row + (1 - momentum)·v)`` (momentum 0.5), then reads them. (The reference code reads,
then updates; updating first means the loss never holds a copy of the K read rows per image, and never has the
memory it read change under its backward pass.)

``crd: loss = CE(z_s, y) + beta·CRD`` (beta 0.8); ``crd_kd`` adds KD's soft term:
``+ kd_weight·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``, T = ``kd_temperature`` (4; the paper's CRD+KD).

The embeddings and the memories train only: the deployable is the plain student (like FitNet's regressor). The
memories are buffers of the trained module, so the epoch checkpoint holds them and a killed run resumes with them.
Under data-parallel training every rank holds the whole memory and applies the same update, of every rank's
images (all-gathered each step), so the copies stay equal.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.errors import UsageError
from kdpipe.ml.data.memory import Batch
from kdpipe.stages.distillers.base import (
    DISTILLERS,
    BodyHead,
    Built,
    DataInfo,
    Distiller,
    TeacherParts,
    labeled_ce,
    spec_shapes,
    split_facts,
    teacher_split,
    trained_split,
)
from kdpipe.stages.distillers.kd import kd_loss


class Embed(nn.Module):
    """Global average pool → linear → L2 normalisation: an (N, C, H, W) map to (N, dim) unit vectors."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(features.flatten(2).mean(2)), dim=1)


def draw_negatives(positives: torch.Tensor, rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, k) rows drawn uniformly among the ``rows - 1`` rows other than each one's positive."""
    drawn = torch.randint(0, rows - 1, (len(positives), k), device=positives.device, generator=generator)
    return drawn + (drawn >= positives[:, None])


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, R) dot products of each anchor (B, d) with the memory rows ``rows`` (B, R): one product with the whole
    memory when that is smaller than gathering the B·R rows (the usual case), else the gathered rows."""
    if len(memory) <= rows.shape[1] * memory.shape[1]:
        return (anchor @ memory.T).gather(1, rows)
    return torch.bmm(memory[rows], anchor[:, :, None]).squeeze(2)


def nce_loss(scores: torch.Tensor, temperature: float, log_z: float, rows: int) -> torch.Tensor:
    """The batch mean of ``-log h(pos) - Σ_k log(1 - h(neg_k))`` for scores (B, 1 + K), the positive first:
    ``h = P / (P + K/M)``, ``P = exp(s/τ - log Z)``, in log space (no overflow, no epsilon)."""
    log_p = scores / temperature - log_z
    log_noise = math.log((scores.shape[1] - 1) / rows)
    log_den = torch.logaddexp(log_p, torch.full_like(log_p, log_noise))
    return -((log_p[:, 0] - log_den[:, 0]) + (log_noise - log_den[:, 1:]).sum(1)).mean()


@torch.no_grad()
def update_memory(memory: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, momentum: float) -> None:
    """``memory[r] = normalise(momentum·memory[r] + (1 - momentum)·v)`` in place; an image that appears more than
    once (on several ranks) contributes the mean of its embeddings, once."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    sums = torch.zeros(len(unique), memory.shape[1], device=memory.device).index_add_(0, inverse, values.float())
    counts = torch.bincount(inverse, minlength=len(unique)).to(sums.dtype)[:, None]
    memory[unique] = F.normalize(momentum * memory[unique] + (1 - momentum) * sums / counts, dim=1)


def gather_ranks(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every data-parallel rank's rows of each tensor, in rank order (ranks may hold different counts); the
    tensors themselves outside a process group."""
    from kdpipe.ml.runtime.distributed import world

    if world()[1] == 1:
        return list(tensors)
    import torch.distributed as dist

    size = world()[1]
    count = torch.tensor([len(tensors[0])], device=tensors[0].device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    out = []
    for t in tensors:
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]))
    return out


def estimate_log_z(scores: torch.Tensor, temperature: float, rows: int) -> torch.Tensor:
    """``log(M · mean(exp(s/τ)))`` over this batch's scores (of every rank under data-parallel training)."""
    from kdpipe.ml.runtime.distributed import world

    lse = torch.logsumexp(scores.detach().double().flatten() / temperature, 0)
    count = torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device)
    if world()[1] > 1:
        import torch.distributed as dist

        parts = torch.stack([lse.exp(), count])
        dist.all_reduce(parts)
        lse, count = parts[0].log(), parts[1]
    return (lse - count.log() + math.log(rows)).float()


class ContrastMemory(nn.Module):
    """The two memories (``student``, ``teacher``: one unit-ish row per training image), the NCE normalisers
    (``log_z``: student anchor, teacher anchor; 0 until estimated) and the training split's dataset indices, which
    map a batch's images to their rows. All are buffers; the indices are not saved (they come from the data)."""

    def __init__(self, train_index: torch.Tensor, dim: int, negatives: int, temperature: float, momentum: float):
        super().__init__()
        rows = len(train_index)
        bound = math.sqrt(3 / dim)  # uniform rows of expected norm 1
        self.register_buffer("student", torch.rand(rows, dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("teacher", torch.rand(rows, dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("log_z", torch.zeros(2))
        self.register_buffer("train_index", torch.sort(train_index.long()).values, persistent=False)
        self.negatives, self.temperature, self.momentum = negatives, temperature, momentum

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The memory rows of dataset indices (every one must be in the training split)."""
        index = index.to(self.train_index.device).contiguous()
        pos = torch.searchsorted(self.train_index, index).clamp_max(len(self.train_index) - 1)
        if not torch.equal(self.train_index[pos], index):
            raise RuntimeError(
                "CRD: a training batch holds an image outside the training split the memory was built for"
            )
        return pos

    def forward(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
        """The CRD term of a batch: update its rows (every rank's), then the two NCE losses."""
        m = len(self.train_index)
        if m < 2:
            raise RuntimeError("CRD: the memory was built without the training split (DataInfo.train_index)")
        rows = self.rows(index)
        all_rows, all_s, all_t = gather_ranks(rows, v_s.detach(), v_t.detach())
        update_memory(self.student, all_rows, all_s, self.momentum)
        update_memory(self.teacher, all_rows, all_t, self.momentum)
        seed = int(torch.randint(0, 2**62, (1,)))  # from the global CPU generator, which epoch checkpoints save
        generator = torch.Generator(device=rows.device).manual_seed(seed)
        columns = torch.cat([rows[:, None], draw_negatives(rows, m, self.negatives, generator)], 1)
        s_scores = contrast_scores(v_s, self.teacher, columns)
        t_scores = contrast_scores(v_t, self.student, columns)
        if not bool(self.log_z.all()):
            self.log_z.copy_(torch.stack([estimate_log_z(sc, self.temperature, m) for sc in (s_scores, t_scores)]))
        z_s, z_t = self.log_z.tolist()
        return nce_loss(s_scores, self.temperature, z_s, m) + nce_loss(t_scores, self.temperature, z_t, m)


class CRDTrainer(BodyHead):
    """What CRD optimises: the student as body + head, the two embeddings and the memory (training-only)."""

    def __init__(self, body: nn.Module, head: nn.Module, embed_s: Embed, embed_t: Embed, memory: ContrastMemory):
        super().__init__(body, head)
        self.embed_s, self.embed_t = embed_s, embed_t
        self.memory = memory


@DISTILLERS.register()
class CRD(Distiller):
    name = "crd"
    title = "CRD"
    signals = frozenset({"features"})
    why_features = "contrasts the teacher's pooled last feature map"
    with_kd: ClassVar[bool] = False

    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        c = conf.crd
        student = data.create(student_arch, conf.student_kwargs)
        s, body, head = trained_split(student, data, conf.student_feature_node, self.title)
        t = teacher_split(teacher, self.title)
        # checks before any stage build without the data: an empty memory, its size checked on the config alone
        index = data.train_index if data.train_index is not None else torch.zeros(0, dtype=torch.long)
        if data.train_index is not None and c.negatives >= len(index):
            raise UsageError(
                f"distill.crd.negatives: {c.negatives} negatives per image need more training images than that; the "
                f"training split has {len(index)} (lower distill.crd.negatives)"
            )
        spec = {
            **self.base_spec(teacher, student_arch, data, conf),
            **split_facts(s, t),
            **spec_shapes(s.feature_shape, t.feature_shape),
            "embed_dim": c.embed_dim,
            "negatives": c.negatives,
            "temperature": c.temperature,
            "momentum": c.momentum,
            "beta": c.beta,
            "kd_weight": c.kd_weight if self.with_kd else 0.0,
            "kd_temperature": c.kd_temperature,
            "train_images": len(index),
            "label_smoothing": conf.train.label_smoothing,
        }
        memory = ContrastMemory(index, c.embed_dim, c.negatives, c.temperature, c.momentum)
        embed_s, embed_t = Embed(s.feature_shape[0], c.embed_dim), Embed(t.feature_shape[0], c.embed_dim)
        return Built(model=student, trainable=CRDTrainer(body, head, embed_s, embed_t, memory), spec=spec)

    def loss(self, built: Built, batch: Batch, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        spec, net = built.spec, built.trainable
        features = net.body(batch.x)  # one student forward: the embedding and the logits share it
        logits = net.head(features)
        with torch.autocast(batch.x.device.type, enabled=False):  # unit vectors and exp(s / 0.07): float32
            v_s = net.embed_s(features.float())
            v_t = net.embed_t(teacher["features"].float())
            crd = net.memory(batch.index, v_s, v_t)
        loss = labeled_ce(logits, batch.y, spec["label_smoothing"]) + spec["beta"] * crd  # the contrast: every image
        if spec["kd_weight"]:  # alpha 1: T²·KL alone
            loss = loss + spec["kd_weight"] * kd_loss(logits, teacher["logits"], batch.y, spec["kd_temperature"], 1.0)
        return loss


@DISTILLERS.register()
class CRDKD(CRD):
    """CRD plus KD's soft term (the paper's CRD+KD)."""

    name = "crd_kd"
    title = "CRD+KD"
    signals = frozenset({"features", "logits"})
    with_kd = True
