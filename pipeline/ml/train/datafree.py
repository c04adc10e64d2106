"""Data-free distillation: a generator, trained against the frozen teacher, makes the student's training images.

No training image is read. Each generator step draws z (and, when conditional, a balanced set of target classes),
generates images in [0, 1] (pixels, like uint8 / 255), normalises them with the data's mean and std as every
model here sees its input, and minimises

``L_G = w_bn·L_bn + w_ce·L_ce + w_ie·L_ie + w_div·L_div + a(t)·w_adv·L_adv``

- ``L_bn`` (DeepInversion): the mean over the teacher's BatchNorm layers of
  ``||mean(x) − running_mean||₂ + ||var(x) − running_var||₂``, where x is the layer's input and mean/var are taken
  over every dimension but the channel (biased variance), read by forward hooks. 0 when the generated batch has the
  statistics the teacher stored for its training data.
- ``L_ce`` (DAFL's one-hot term): cross-entropy of the teacher's logits with the target class: the sampled one
  (conditional generator) or the teacher's own argmax (unconditional, DAFL): confident teacher predictions.
- ``L_ie`` (DAFL's information entropy): ``log K − H(p̄)``, p̄ the batch's mean teacher softmax: 0 when the batch is
  spread evenly over the K classes, so the generator does not make one class only.
- ``L_div`` (mode seeking, Mao et al. 2019, within a class): the mean over pairs of images of the same target class
  of ``mean|z_i − z_j| / (mean|x_i − x_j| + 0.01)``: large when different noise gives the same image. Without it the
  class-conditional generator settled, on Fashion-MNIST, on one image per class whatever z was.
- ``L_adv`` (DFAD): ``−mean_i m_i · mean_k |s_ik − t_ik|``, minus the L1 distance between student and teacher
  logits: the generator seeks images on which they disagree.

The curriculum (CuDFKD, easy to hard) is two simple rules: the adversarial weight ``a(t)`` rises linearly from 0
to 1 over the first ``adversarial_ramp`` of the training steps, and, per image, ``m_i = 1`` only while the student
still predicts the teacher's class (an easy image); an image the student already gets wrong (a hard one) is not
pushed further from what the teacher knows (``easy_only: false``: ``m_i = 1`` for all).

The student never trains on the generator's graph: each generated batch goes, as uint8 images with the teacher's
argmax as label and the teacher's logits, into a pool of the most recent ``pool_size`` images, and the student's
batches are drawn from the pool (:class:`SyntheticSource`): with ``replay: stored`` as they are, the teacher's
logits stored with them (no second teacher pass: a method that needs only logits), with ``replay: online`` with the
usual crop and flip, the teacher run on them as on real batches (any method). The teacher's class histogram of every
generated image is counted per epoch to detect a collapsed generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import Augment, DataFreeConfig
from kdpipe.ml.data.memory import Batch, augment, normalize

TERMS = ("bn", "ce", "entropy", "diversity", "adversarial")


class Generator(nn.Module):
    """DCGAN-style generator sized to the data: ``[z, class embedding] → linear → BN → [upsample ×2 → conv 3×3 →
    BN → LeakyReLU] × n → conv 3×3 → sigmoid``, images in [0, 1] of the data's (C, H, W).

    ``n`` doubles the starting map (at most 8 pixels a side) up to the image size; a size that is not the start
    times a power of two is reached by a final bilinear resize. The class embedding (conditional only) is
    concatenated to z; it starts as 3 × one-hot (up to 64 classes; a random one of 64 dimensions beyond), which
    made the teacher recognise the target classes about twice as fast as multiplying it into z.
    """

    def __init__(
        self, z_dim: int, num_classes: int, shape: tuple[int, int, int], width: int = 64, conditional: bool = True
    ) -> None:
        super().__init__()
        c, h, w = shape
        self.shape = (c, h, w)
        self.z_dim = z_dim
        self.blocks = max(0, math.ceil(math.log2(max(h, w) / 8)))
        self.start = (math.ceil(h / 2**self.blocks), math.ceil(w / 2**self.blocks))
        self.channels = 2 * width
        self.embed = nn.Embedding(num_classes, min(num_classes, 64)) if conditional else None
        if self.embed is not None and num_classes <= 64:
            with torch.no_grad():
                self.embed.weight.copy_(3 * torch.eye(num_classes))
        extra = self.embed.embedding_dim if self.embed is not None else 0
        self.fc = nn.Linear(z_dim + extra, self.channels * self.start[0] * self.start[1])
        layers: list[nn.Module] = [nn.BatchNorm2d(self.channels)]
        cin = self.channels
        for i in range(self.blocks):
            cout = self.channels if i < self.blocks - 1 else width
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            cin = cout
        layers += [nn.Conv2d(cin, c, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images for noise ``z`` and, conditional, targets ``y``: class indices, or (N, K) class weights (a mixed
        target embeds as the weighted sum of its classes' embeddings)."""
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional generator needs target classes")
            e = self.embed(y) if not y.is_floating_point() else y.to(self.embed.weight.dtype) @ self.embed.weight
            z = torch.cat([z, e], 1)
        x = self.net(self.fc(z).view(len(z), self.channels, *self.start))
        if tuple(x.shape[2:]) != self.shape[1:]:
            x = F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)
        return x


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that hold running statistics (none in a TorchScript module we can hook)."""
    if isinstance(model, torch.jit.ScriptModule):
        return []
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]


class BNStatistics:
    """Forward hooks on every BatchNorm layer of a model. Inside :meth:`recording`, each layer appends
    ``||mean(x) − running_mean||₂ + ||var(x) − running_var||₂`` of its input x; outside, the hooks do nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = batchnorm_layers(model)
        self.distances: list[torch.Tensor] | None = None
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.distances is None:
            return
        x = inputs[0].float()
        dims = [d for d in range(x.ndim) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.distances.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        self.distances = []
        try:
            yield self.distances
        finally:
            self.distances = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def bn_term(distances: list[torch.Tensor]) -> torch.Tensor:
    """``L_bn``: the mean of the per-layer distances :class:`BNStatistics` recorded."""
    return torch.stack(distances).mean()


def class_term(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``L_ce``: cross-entropy of the teacher's logits with the targets: class indices (one-hot), or (N, K) class
    probabilities (mixed targets)."""
    return F.cross_entropy(teacher_logits.float(), targets)


def entropy_term(teacher_logits: torch.Tensor) -> torch.Tensor:
    """``L_ie = log K − H(p̄)``, p̄ the mean softmax over the batch: ≥ 0, and 0 exactly when p̄ is uniform."""
    p = F.softmax(teacher_logits.float(), dim=1).mean(0)
    return math.log(p.numel()) + (p * torch.log(p.clamp_min(1e-12))).sum()


def same_class_pairs(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (a, b) of images with the same target class: each with the next of its class in the batch."""
    order = torch.argsort(targets * len(targets) + torch.arange(len(targets), device=targets.device))
    a, b = order[:-1], order[1:]
    keep = targets[a] == targets[b]
    return a[keep], b[keep]


def pair_distance(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Mean absolute pixel difference between images of the same class (None without such a pair)."""
    a, b = same_class_pairs(targets)
    return (images[a] - images[b]).abs().flatten(1).mean(1) if len(a) else None


def diversity_term(images: torch.Tensor, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``L_div``: mean over same-class pairs of ``mean|z_i − z_j| / (mean|x_i − x_j| + 0.01)`` (mode seeking)."""
    a, b = same_class_pairs(targets)
    if not len(a):
        return images.sum() * 0
    dx = (images[a] - images[b]).abs().flatten(1).mean(1)
    dz = (z[a] - z[b]).abs().mean(1)
    return (dz / (dx + 0.01)).mean()


def easy_mask(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """1.0 for the images on which the student predicts the teacher's class (easy), 0.0 for the others (hard)."""
    return (student_logits.argmax(1) == teacher_logits.argmax(1)).float()


def adversarial_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_adv = −mean_i m_i · mean_k |s_ik − t_ik|``: minimising it drives student and teacher apart."""
    distance = (student_logits.float() - teacher_logits.float()).abs().mean(1)
    if mask is not None:
        distance = distance * mask
    return -distance.mean()


def ramp(step: int, total: int, fraction: float) -> float:
    """The curriculum's adversarial factor at ``step`` of ``total``: linear from 0 to 1 over ``fraction``."""
    if fraction <= 0:
        return 1.0
    return min(1.0, step / max(1.0, fraction * total))


def class_balance(counts: torch.Tensor) -> dict[str, Any]:
    """The largest class's share and the normalised entropy (H / log K) of a class histogram."""
    total = int(counts.sum())
    k = len(counts)
    if total == 0:
        return {"images": 0, "largest_class": None, "largest_share": 0.0, "entropy": 0.0}
    p = counts.double() / total
    h = float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(k) if k > 1 else 1.0
    return {"images": total, "largest_class": int(counts.argmax()), "largest_share": float(p.max()), "entropy": h}


def collapse(
    balance: dict[str, Any], max_share: float, min_entropy: float, classes: list[str] | None = None
) -> str | None:
    """Why a class histogram (see :func:`class_balance`) looks collapsed, or None."""
    if not balance["images"]:
        return None
    if balance["largest_share"] > max_share:
        k = balance["largest_class"]
        name = f"'{classes[k]}'" if classes and k < len(classes) else str(k)
        return f"class {name} is {balance['largest_share']:.0%} of the generated images (limit {max_share:.0%})"
    if balance["entropy"] < min_entropy:
        entropy = balance["entropy"]
        return f"the generated classes' entropy is {entropy:.2f} of a uniform spread's (limit {min_entropy:.2f})"
    return None


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images → uint8 on the CPU (what the pool, the saved samples and int8 calibration hold)."""
    return (images.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8).cpu()


class SyntheticSource:
    """The student's training batches, made by a generator trained against the frozen teacher (the module doc).

    The training loop (:func:`~kdpipe.ml.train.training.fit`, argument ``source``) asks it for an epoch's batches and
    checkpoints :meth:`state_dict` with the student; batches are a pure function of (seed, epoch) and that state, so
    a killed run resumes to the same result.

    Args:
        generator: the generator (trained here).
        teacher: the frozen teacher (images → logits); its BatchNorm layers are hooked when ``weights["bn"] > 0``.
        student: the deployable student (images → logits), read by the adversarial term, never updated here.
        conf: ``distill.datafree``.
        weights: each term's weight as used (a term the teacher cannot support is 0).
        batch_size: the student's batch size.
        epochs: training epochs (the curriculum's length is ``epochs × steps``).
        seed: seed of z, the target classes and the draws from the pool.
        classes: class names (collapse messages name the class).
        log: where a collapsed epoch is warned about.
        left_out: the terms not used and why (for the report).
        stored: student batches are pool images as generated, with the teacher's logits stored at generation
            (:meth:`teacher_signals`); else crop and flip them (the teacher then runs on them online).
    """

    def __init__(
        self,
        generator: Generator,
        teacher: nn.Module,
        student: nn.Module,
        conf: DataFreeConfig,
        weights: dict[str, float],
        num_classes: int,
        mean: list[float],
        std: list[float],
        augment_conf: Augment,
        batch_size: int,
        epochs: int,
        seed: int,
        device: torch.device,
        classes: list[str] | None = None,
        log: Callable[[str], None] | None = None,
        left_out: dict[str, str] | None = None,
        stored: bool = False,
    ) -> None:
        self.generator = generator.to(device)
        self.teacher = teacher
        self.student = student
        self.conf = conf
        self.weights = {k: float(weights.get(k, 0.0)) for k in TERMS}
        self.num_classes = num_classes
        self.mean, self.std = mean, std
        self.augment_conf = augment_conf
        self.batch_size = batch_size
        self.steps = conf.steps_per_epoch
        self.total = epochs * self.steps
        self.seed = seed
        self.device = device
        self.classes = list(classes) if classes else [str(k) for k in range(num_classes)]
        self.log = log
        self.left_out = dict(left_out or {})
        self.stored = stored
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=conf.lr, betas=(0.5, 0.999))
        self.bn = BNStatistics(teacher) if self.weights["bn"] > 0 else None
        self.pool = torch.zeros((0, *generator.shape), dtype=torch.uint8)
        self.pool_labels = torch.zeros(0, dtype=torch.long)
        self.pool_logits = torch.zeros(0, num_classes)
        self.current = self.pool_logits
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.counts = torch.zeros(self.num_classes, dtype=torch.long)
        self.sums = dict.fromkeys(("loss", *TERMS), 0.0)
        self.generator_steps = 0
        self.factor = 0.0
        self.spread, self.spread_steps = 0.0, 0

    def batches(self, epoch: int) -> Iterator[Batch]:
        """One epoch's student batches; a generator step comes before every ``generator_every``-th one."""
        self._reset_epoch()
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        for i in range(self.steps):
            if i % self.conf.generator_every == 0:
                self.generator_step(epoch * self.steps + i, g)
            idx = torch.randint(0, len(self.pool), (self.batch_size,), generator=g)
            x = self.pool[idx] if self.stored else augment(self.pool[idx], self.augment_conf, g)
            self.current = self.pool_logits[idx]
            yield Batch(normalize(x, self.mean, self.std), self.pool_labels[idx], idx)

    def teacher_signals(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``replay: stored``: the teacher's logits of the batch just drawn, stored when its images were generated
        (on the images before rounding to uint8, which moves a pixel by at most 1/510)."""
        if len(self.current) != len(batch.x):
            raise RuntimeError("stored teacher logits asked for another batch than the one just drawn")
        return {"logits": self.current.to(batch.x.device)}

    def targets(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Major classes spread evenly over the batch (shuffled), so every class is asked for equally, and the
        target distributions: one-hot, except for a ``mix`` share of the images, whose target gives weight
        λ ~ U(0.5, 1) to the major class and the rest to another class drawn at random."""
        k = self.num_classes
        y = torch.randperm(n, generator=g) % k
        q = F.one_hot(y, k).float()
        mixed = torch.rand(n, generator=g) < self.conf.mix
        other = (y + torch.randint(1, max(2, k), (n,), generator=g)) % k
        lam = 0.5 + 0.5 * torch.rand(n, generator=g)
        q[mixed] = lam[mixed, None] * q[mixed] + (1 - lam[mixed, None]) * F.one_hot(other[mixed], k).float()
        return y, q

    def generate(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """``n`` images in [0, 1], their noise z, major classes and target distributions (on the device)."""
        z = torch.randn(n, self.generator.z_dim, generator=g).to(self.device)
        y, q = (t.to(self.device) for t in self.targets(n, g))
        return self.generator(z, q if self.generator.embed is not None else None), z, y, q

    def losses(
        self, images: torch.Tensor, z: torch.Tensor, targets: torch.Tensor, q: torch.Tensor, factor: float
    ) -> dict[str, torch.Tensor]:
        """Every term in use on one generated batch (the module doc), and the teacher's logits (``"logits"``)."""
        w = self.weights
        x = normalize(images, self.mean, self.std)
        if self.bn is not None:
            with self.bn.recording() as distances:
                t = self.teacher(x)
        else:
            t = self.teacher(x)
        out: dict[str, torch.Tensor] = {"logits": t.detach()}
        if self.bn is not None and distances:
            out["bn"] = bn_term(distances)
        conditional = self.generator.embed is not None
        classes = targets if conditional else t.argmax(1)
        if w["ce"]:
            out["ce"] = class_term(t, q if conditional else classes)
        if w["entropy"]:
            out["entropy"] = entropy_term(t)
        if w["diversity"]:
            out["diversity"] = diversity_term(images, z, classes)
        if w["adversarial"] and factor > 0:
            s = self._student_logits(x)
            out["adversarial"] = adversarial_term(s, t, easy_mask(s, t) if self.conf.easy_only else None)
        return out

    def _student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The student's logits with gradients to the input only: eval mode (its BN statistics stay as they are),
        its parameters untouched (their grads are not even computed)."""
        was = self.student.training
        flags = [(p, p.requires_grad) for p in self.student.parameters()]
        self.student.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            return self.student(x)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            self.student.train(was)

    def generator_step(self, step: int, g: torch.Generator) -> None:
        """One update of the generator; its (quantised) images join the pool."""
        self.generator.train()
        self.factor = ramp(step, self.total, self.conf.adversarial_ramp)
        images, z, targets, q = self.generate(self.conf.batch_size, g)
        terms = self.losses(images, z, targets, q, self.factor)
        logits = terms.pop("logits")
        weights = {k: self.weights[k] * (self.factor if k == "adversarial" else 1.0) for k in terms}
        loss = sum(weights[k] * v for k, v in terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        labels = self.add(images.detach(), logits)
        spread = pair_distance(images.detach(), targets if self.generator.embed is not None else labels)
        if spread is not None:
            self.spread += float(spread.mean())
            self.spread_steps += 1
        self.sums["loss"] += float(loss.detach())
        for k, v in terms.items():
            self.sums[k] += float(v.detach())
        self.generator_steps += 1
        if self.conf.extra_images:  # more images from the updated generator: a teacher forward pass each, no backward
            with torch.no_grad():
                more, *_ = self.generate(self.conf.extra_images, g)
                self.add(more, self.teacher(normalize(more, self.mean, self.std)))

    def add(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Put generated images (and the teacher's logits of them) into the pool and the epoch's class histogram;
        returns the teacher's classes."""
        labels = logits.argmax(1).cpu()
        self.counts += torch.bincount(labels, minlength=self.num_classes)
        self.pool = torch.cat([self.pool, quantize(images)])[-self.conf.pool_size :]
        self.pool_labels = torch.cat([self.pool_labels, labels])[-self.conf.pool_size :]
        self.pool_logits = torch.cat([self.pool_logits, logits.detach().float().cpu()])[-self.conf.pool_size :]
        return labels

    def epoch_record(self) -> dict[str, Any]:
        """What the generator did this epoch: mean loss and terms, the adversarial factor, its class balance."""
        n = max(1, self.generator_steps)
        balance = class_balance(self.counts)
        collapsed = collapse(balance, self.conf.collapse_share, self.conf.collapse_entropy, self.classes)
        if collapsed and self.log:
            self.log(f"warning: distill: the generator looks collapsed this epoch: {collapsed}")
        return {
            "generator": {
                "steps": self.generator_steps,
                "loss": self.sums["loss"] / n,
                "terms": {k: self.sums[k] / n for k in TERMS if self.weights[k]},
                "adversarial_factor": self.factor,
                "same_class_distance": self.spread / max(1, self.spread_steps),
                "class_counts": self.counts.tolist(),
                "largest_class": balance["largest_class"],
                "largest_share": balance["largest_share"],
                "entropy": balance["entropy"],
                "collapse": collapsed,
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "pool": self.pool.clone(),
            "pool_labels": self.pool_labels.clone(),
            "pool_logits": self.pool_logits.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pool = state["pool"].to(torch.uint8)
        self.pool_labels = state["pool_labels"].long()
        self.pool_logits = state["pool_logits"].float()

    def samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``n`` generated images (uint8, what the student trained on last) and the teacher's classes."""
        return self.pool[-n:].clone(), self.pool_labels[-n:].clone()

    def close(self) -> None:
        if self.bn is not None:
            self.bn.remove()
