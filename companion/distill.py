"""Few-step students distilled from a bundled teacher: progressive and consistency distillation, and reflow.

Both are training tasks of :mod:`companion.train` (progress bar, EMA, fixed seeds, resumable checkpoints,
asset cards); their recipes (``digits-pd-*``, the group ``digits-pd`` and ``digits-cd``) are data in
:mod:`companion.recipes` and run with ``companion train``. Students are ordinary
:class:`~companion.models.DiffusionModel` s that output v instead of eps (``prediction="v_prediction"``): at
the noisiest timestep of the linear schedule alpha = sqrt(abar) ~ 0.006, so an eps-network would have to be
160x more precise than its x0 estimate needs to be; with v, x0 = alpha x_t - sigma v is well conditioned
everywhere. They start from the teacher's weights (read as v, its eps output is already a fair first guess:
eps_v = sigma x_t + alpha eps_teacher).

* **Progressive distillation** (Salimans & Ho, arXiv 2202.00512): a student learns to take in ONE step of
  the deterministic Euler/DDIM sampler what its teacher does in TWO, so the step count halves per stage
  (``digits-pd-32`` learns from the teacher at 64 steps, ``digits-pd-16`` from ``digits-pd-32``, ... down to
  ``digits-pd-1``). Every stage is kept. Students sample with ``sampler="euler", spacing="trailing"`` at
  their own step count (:data:`STUDENT_SAMPLING`); on that grid Euler is DDIM, and trailing grids of
  2N and N steps are nested, so each student step covers exactly two teacher steps.
* **Consistency distillation** (Song et al., arXiv 2303.01469; in DDPM time as in Latent Consistency Models,
  arXiv 2310.04378): one student maps any point x_t of the teacher's ODE trajectory straight to its end,
  trained so that its outputs at neighbouring timesteps of the 50-step grid (one teacher DDIM step apart)
  agree. It samples with the ``lcm`` sampler in 1-4 steps.

* **Guidance distillation** (Meng et al., arXiv 2210.03142, its first stage): classifier-free guidance costs two
  network calls per step (conditional and unconditional); a student that takes the guidance scale w as an input
  learns the teacher's guided output eps_u + w (eps_c - eps_u) in one (:class:`companion.models.GuidanceDistilledModel`,
  trained on a grid of scales). It samples with the teacher's own samplers at half the NFE.
* **Reflow** (2-rectified flow; Liu et al., arXiv 2209.03003, sec. 2.3; the first stage of InstaFlow, arXiv
  2309.06380): the flow teacher ``digits-flow`` carries noise z to a sample x0 along its ODE; a student fit to
  these *coupled* pairs (instead of independent noise and data) learns paths that cross less and are straighter,
  so one or two Euler steps land close to where the teacher's fifty do. It samples with FlowMatch Euler.

The teacher of the first two is the class-conditional ``digits-cond``; students keep its class labels (and, with the same
class dropout, its "no class" label, so classifier-free guidance still works on them).
"""
from __future__ import annotations

import copy

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, LCMScheduler, UNet2DModel

from . import samplers, train
from .device import generator
from .errors import ModelError
from .models import FLOW_SCHEDULE, DiffusionModel, FlowModel, GuidanceDistilledModel, load
from .sampling import sample
from .schedules import x0_from_v

PD_STAGES = (32, 16, 8, 4, 2, 1)
PD_TEACHER_STEPS = 64  # the first stage imitates the teacher at 64 Euler steps
CD_GRID = 50  # consistency pairs are neighbours on LCM's 50-step grid 999, 979, ..., 19 (and t = -1: x0)

# how each student is meant to be sampled (the panel and the chapter default to this)
STUDENT_SAMPLING = {"progressive": dict(sampler="euler", spacing="trailing"), "consistency": dict(sampler="lcm"),
                    "reflow": dict(sampler="euler"),  # on a flow model "euler" is diffusers' FlowMatch Euler
                    "guidance": dict(sampler="ddim", spacing="trailing")}
REFLOW_TEACHER_STEPS = 50  # FlowMatch Euler steps of the teacher for each (noise, sample) pair


def pd_name(steps: int) -> str:
    return f"digits-pd-{steps}"


def student_sampling(model) -> dict:
    """``sample()`` keyword arguments a distilled student is meant for: sampler, spacing and its step count."""
    info = getattr(model, "card", {}).get("distillation")
    if not info:
        raise ModelError(f"model {getattr(model, 'name', model)!r} is not a distilled student (no 'distillation' in its card)")
    return dict(STUDENT_SAMPLING[info["method"]], steps=int(info["student_steps"]))


def euler_grid(model: DiffusionModel, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (steps,), sigmas (steps + 1,), ending in 0) of the trailing-spaced Euler sampler."""
    sched = samplers.build_scheduler("euler", model.scheduler_config, spacing="trailing")
    sched.set_timesteps(steps)
    return sched.timesteps.to(torch.float32).clone(), sched.sigmas.to(torch.float32).clone()


def pd_target(x_ve: torch.Tensor, x_end: torch.Tensor, s0: torch.Tensor, s_end: torch.Tensor) -> torch.Tensor:
    """The x0 estimate whose single Euler step from (x_ve, s0) lands on x_end at s_end (Salimans & Ho, eq. 8 in
    the variance-exploding scaling): x_end = x_ve + (s_end - s0)(x_ve - x0)/s0, solved for x0."""
    return x_ve - s0 * (x_end - x_ve) / (s_end - s0)


class _StudentTask(train.Task):
    """Common part: load the teacher, start the student from its weights, save the student as a v-model."""

    method = ""
    teacher_kind = "diffusion"  # "flow" for a student of a rectified-flow teacher

    def __init__(self, rec, cfg):
        self.teacher = load(cfg["teacher"], device="cpu").requires_grad_(False)
        kind = "flow" if isinstance(self.teacher, FlowModel) else "diffusion"
        if not isinstance(self.teacher, DiffusionModel) or kind != self.teacher_kind or not self.teacher.conditional:
            raise ModelError(f"teacher {cfg['teacher']!r} must be a class-conditional {self.teacher_kind} model")
        super().__init__(rec, cfg)

    def build(self):
        return copy.deepcopy(self.teacher.unet).train().requires_grad_(True)

    def labels(self, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        drop = torch.rand(y.shape[0], generator=g) < self.cfg["class_dropout"]
        return torch.where(drop, torch.full_like(y, self.teacher.null_class), y)

    def student_x0(self, net, x_t, t, labels, alpha, sigma):
        return x0_from_v(net(x_t, t, class_labels=labels).sample, x_t, alpha, sigma)

    def save(self, ema, out, card):
        t = self.teacher
        student = DiffusionModel(ema, t.scheduler_config, name=self.rec.name, sample_shape=t.sample_shape,
                                 num_classes=t.num_classes, prediction="v_prediction")
        info = dict(method=self.method, teacher=self.cfg["teacher"], student_steps=self.cfg["student_steps"],
                    **STUDENT_SAMPLING[self.method])
        return student.save(out, dict(card, distillation=info), weights_dtype=torch.float16)


class ProgressiveStage(_StudentTask):
    """One halving: the student's single Euler step from sigma_i to sigma_{i+2} must land where the teacher's two
    steps (sigma_i -> sigma_{i+1} -> sigma_{i+2}) land. Loss on x0 with truncated-SNR weight max(SNR, 1)."""

    method = "progressive"

    def __init__(self, rec, cfg):
        super().__init__(rec, cfg)
        self.t_grid, self.s_grid = euler_grid(self.teacher, 2 * cfg["student_steps"])

    @torch.no_grad()
    def _teacher_step(self, x_ve, i, labels):
        """One Euler step of the teacher in the variance-exploding scaling x_ve = x_t / alpha."""
        s, s_next = self.s_grid[i], self.s_grid[i + 1]
        b = (-1, 1, 1, 1)
        x_in = x_ve / torch.sqrt(1 + s**2).view(b)
        eps = self.teacher.predict_noise(x_in, self.t_grid[i], labels)
        return x_ve + (s_next - s).view(b) * eps

    def loss(self, g):
        x0, y = self.batch(g)
        labels = self.labels(y, g)
        b = (-1, 1, 1, 1)
        i = 2 * torch.randint(0, self.cfg["student_steps"], (x0.shape[0],), generator=g)
        s0, s2 = self.s_grid[i].view(b), self.s_grid[i + 2].view(b)
        x_ve = x0 + s0 * torch.randn(x0.shape, generator=g)
        x2 = self._teacher_step(self._teacher_step(x_ve, i, labels), i + 1, labels)
        target = pd_target(x_ve, x2, s0, s2)
        alpha = 1 / torch.sqrt(1 + s0**2)
        x0_s = self.student_x0(self.net, x_ve * alpha, self.t_grid[i], labels, alpha, s0 * alpha)
        weight = torch.clamp(1 / s0**2, min=1.0)
        return (weight * (x0_s - target) ** 2).mean()


class ConsistencyDistillation(_StudentTask):
    """f(x_t, t) = c_skip x_t + c_out x0(x_t, t) (LCM's boundary scalings, f(x, 0) = x) must agree between
    t_n and the point one teacher DDIM step earlier, t_n - 20; the target network is an EMA of the student."""

    method = "consistency"

    def __init__(self, rec, cfg):
        super().__init__(rec, cfg)
        self.lcm = LCMScheduler.from_config(self.teacher.scheduler_config, original_inference_steps=CD_GRID)
        self.abar = self.lcm.alphas_cumprod.to(torch.float32)
        self.skip = self.teacher.num_train_timesteps // CD_GRID
        self.grid = torch.arange(1, CD_GRID + 1) * self.skip - 1  # 19, 39, ..., 999
        self.target = copy.deepcopy(self.net).eval().requires_grad_(False)

    def checkpoint_modules(self):
        return {"target": self.target}

    def _ab(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.where(t >= 0, self.abar[t.clamp(min=0)], torch.ones(()))  # t = -1: the clean end, abar = 1
        return a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)

    def consistency(self, net, x_t, t, labels):
        alpha, sigma = self._ab(t)
        c_skip, c_out = self.lcm.get_scalings_for_boundary_condition_discrete(t.clamp(min=0))
        x0 = self.student_x0(net, x_t, t.clamp(min=0), labels, alpha, sigma)
        f = c_skip.view(-1, 1, 1, 1) * x_t + c_out.view(-1, 1, 1, 1) * x0
        return torch.where((t < 0).view(-1, 1, 1, 1), x_t, f)

    def loss(self, g):
        with torch.no_grad():  # the target network trails the student (updated after every optimiser step)
            for pt, pn in zip(self.target.parameters(), self.net.parameters()):
                pt.lerp_(pn, 1 - self.cfg["target_ema"])
        x0, y = self.batch(g)
        labels = self.labels(y, g)
        t = self.grid[torch.randint(0, CD_GRID, (x0.shape[0],), generator=g)]
        t_prev = t - self.skip
        alpha, sigma = self._ab(t)
        x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=g)
        with torch.no_grad():  # one DDIM step of the teacher along its ODE: t -> t_prev
            eps = self.teacher.predict_noise(x_t, t, labels)
            a_p, s_p = self._ab(t_prev)
            x_prev = a_p * (x_t - sigma * eps) / alpha + s_p * eps
            target = self.consistency(self.target, x_prev, t_prev, labels)
        return ((self.consistency(self.net, x_t, t, labels) - target) ** 2).mean()



class GuidanceDistillation(_StudentTask):
    """The student eps(x_t, t, y, w) regresses the teacher's guided eps_u + w (eps_c - eps_u) (one batched teacher call
    for both halves) at a scale w drawn from ``guidance_grid`` and t uniform over the 1000 training timesteps. It starts
    from the teacher: the class embedding of class c is copied to every scale's row for c, so at step 0 the student
    is the teacher's conditional model at every w (which is the target at w = 1)."""

    method = "guidance"

    def __init__(self, rec, cfg):
        self.grid = torch.tensor([float(w) for w in cfg["guidance_grid"]])
        super().__init__(rec, cfg)
        self.scheduler = DDPMScheduler.from_config(self.teacher.scheduler_config)

    def build(self):
        teacher = self.teacher.unet
        rows = teacher.class_embedding.weight.shape[0]  # num_classes + 1 ("no class" last)
        student = UNet2DModel(**dict(teacher.config, num_class_embeds=rows * len(self.grid)))
        state = dict(teacher.state_dict())
        state["class_embedding.weight"] = teacher.class_embedding.weight.detach().repeat(len(self.grid), 1)
        student.load_state_dict(state)
        return student.train().requires_grad_(True)

    def loss(self, g):
        x0, y = self.batch(g)
        n = x0.shape[0]
        k = torch.randint(0, len(self.grid), (n,), generator=g)
        w = self.grid[k].view(-1, 1, 1, 1)
        t = torch.randint(0, self.teacher.num_train_timesteps, (n,), generator=g)
        x_t = self.scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            null = torch.full_like(y, self.teacher.null_class)
            eps_c, eps_u = self.teacher.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
            target = eps_u + w * (eps_c - eps_u)
        rows = self.teacher.num_classes + 1
        return F.mse_loss(self.net(x_t, t, class_labels=y + rows * k).sample, target)

    def save(self, ema, out, card):
        t = self.teacher
        student = GuidanceDistilledModel(ema, t.scheduler_config, name=self.rec.name, sample_shape=t.sample_shape,
                                         num_classes=t.num_classes, guidance_grid=self.grid.tolist(),
                                         default_guidance=self.cfg["default_guidance"])
        info = dict(method=self.method, teacher=self.cfg["teacher"], student_steps=self.cfg["student_steps"],
                    **STUDENT_SAMPLING[self.method])
        return student.save(out, dict(card, distillation=info), weights_dtype=torch.float16)


@torch.no_grad()
def reflow_pairs(teacher: FlowModel, n: int, *, steps: int = REFLOW_TEACHER_STEPS, seed: int = 0,
                 batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(noise, sample, label)``: ``n`` couplings of the teacher's ODE (FlowMatch Euler, ``steps`` steps, no guidance),
    class labels balanced (0, 1, ..., k - 1, 0, 1, ...). The same pairs for the same arguments on every run."""
    if not isinstance(teacher, FlowModel):
        raise ModelError(f"reflow needs a flow teacher (prediction 'flow'); {teacher.name!r} predicts {teacher.prediction!r}")
    if n < 1 or steps < 1:
        raise ValueError(f"reflow_pairs needs n >= 1 and steps >= 1, got n={n}, steps={steps}")
    k = teacher.num_classes or 1
    labels = torch.arange(k).repeat(math.ceil(n / k))[:n]
    g = generator(seed)
    zs, xs = [], []
    for j in range(0, n, batch):
        z = torch.randn((min(batch, n - j), *teacher.sample_shape), generator=g)
        cls = labels[j : j + len(z)] if teacher.num_classes else None
        xs.append(sample(teacher, "euler", steps, x_T=z, class_labels=cls, batch=len(z)).images)
        zs.append(z)
    return torch.cat(zs), torch.cat(xs), labels


class Reflow(_StudentTask):
    """2-rectified flow: the flow-matching loss on the teacher's own couplings (z, x0) instead of independent noise
    and data: x_t = (1 - t) x0 + t z, target z - x0, t ~ U(0, 1). Starts from the teacher's weights; class dropout
    as the teacher's, so guidance still works. The pairs are drawn once, before the first step (``pairs`` of them,
    the teacher at ``teacher_steps``), from the recipe's seed."""

    method = "reflow"
    teacher_kind = "flow"

    def __init__(self, rec, cfg):
        super().__init__(rec, cfg)
        self.z, self.x0, self.pair_labels = reflow_pairs(self.teacher, cfg["pairs"], steps=cfg["teacher_steps"],
                                                          seed=cfg.get("pair_seed", 0))

    def loss(self, g):
        idx = torch.randint(0, len(self.z), (self.cfg["batch"],), generator=g)
        z, x0 = self.z[idx], self.x0[idx]
        labels = self.labels(self.pair_labels[idx], g)
        t = torch.rand(z.shape[0], generator=g)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * z
        n_train = FLOW_SCHEDULE["num_train_timesteps"]
        return F.mse_loss(self.net(x_t, t * n_train, class_labels=labels).sample, z - x0)

    def save(self, ema, out, card):
        t = self.teacher
        student = FlowModel(ema, t.scheduler_config, name=self.rec.name, sample_shape=t.sample_shape,
                            num_classes=t.num_classes)
        info = dict(method=self.method, teacher=self.cfg["teacher"], student_steps=self.cfg["student_steps"],
                    pairs=self.cfg["pairs"], teacher_steps=self.cfg["teacher_steps"], **STUDENT_SAMPLING[self.method])
        return student.save(out, dict(card, distillation=info), weights_dtype=torch.float16)
