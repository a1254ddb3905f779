"""Measured quality of a trained model, recorded in its card (the ``quality`` entry).

Each bundled model's recipe (:mod:`companion.recipes`) names one of these measurements; ``companion train``
runs it after training and :func:`companion.recipes.measure_quality` re-runs it on a saved model. They sample
with :func:`companion.sampling.sample` (deterministic DDIM with trailing spacing, or a student's own sampler)
and score with :mod:`companion.metrics` in a bundled feature network's space, so card numbers and the
chapters' numbers come from the same code. Each measurement is ``fn(model, progress) -> dict`` (JSON-ready).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from . import assets, data, metrics
from .device import generator
from .distill import student_sampling
from .models import DiffusionModel
from .sampling import sample
from .schedules import TRAIN_SCHEDULE

SHAPES_EVAL_STEPS = 20
SHAPES_EVAL_SAMPLES = 300


@torch.no_grad()
def ddim_samples(model: DiffusionModel, n: int, *, steps: int = 50, guidance: float | None = None,
                 class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None, seed: int = 0,
                 batch: int = 250) -> torch.Tensor:
    """``n`` deterministic DDIM samples (decoded images, trailing spacing) for the quality measurements of the cards.

    Sampled in chunks of ``batch``; the initial noise of all chunks is one stream from ``seed`` drawn chunk by
    chunk, as the bundled cards were measured, and ``class_labels``/``cond`` are split the same way.
    """
    g = generator(seed)
    outs = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        x_T = torch.randn((m, *model.sample_shape), generator=g)
        labels = class_labels[i : i + m] if class_labels is not None else None
        c = cond[i : i + m] if cond is not None else None
        outs.append(sample(model, "ddim", steps, spacing="trailing", x_T=x_T, class_labels=labels, guidance=guidance,
                           cond=c, batch=m).images)
    return torch.cat(outs)


def _bundled(name: str) -> bool:
    return (assets.models_dir() / name / assets.CARD).is_file()


def measurement_dict(measurement: metrics.Measurement) -> dict:
    """A companion.metrics Measurement as a small JSON dict."""
    return {"value": round(measurement.value, 4), "low": round(measurement.low, 4), "high": round(measurement.high, 4),
            "n": measurement.n, "feature": measurement.feature}


def digits_reference_classifier():
    """Logistic regression on 8x8 average-pooled 16x16 *train* digits: the held-out judge of class accuracy."""
    from sklearn.linear_model import LogisticRegression  # scikit-learn: imported only when a judge is needed

    x, y = data.digits(16, "train")
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(F.avg_pool2d(x, 2).flatten(1).numpy(), y.numpy())
    xt, yt = data.digits(16, "test")
    acc = float((clf.predict(F.avg_pool2d(xt, 2).flatten(1).numpy()) == yt.numpy()).mean())
    return clf, acc


def digits_class_quality(samples, labels: torch.Tensor, sampler: str, guidances, *, out_of_range: bool = False) -> dict:
    """The card measurement of a class-conditional digits model: class accuracy judged by
    :func:`digits_reference_classifier` and by features-digits, and FD, of the images ``samples(guidance)`` drawn for
    ``labels`` at each guidance scale (``sampler`` names how they were drawn). ``out_of_range``: also the share of
    pixels outside [-1.05, 1.05] before clamping (a model whose samples leave the data range)."""
    clf, test_acc = digits_reference_classifier()
    out = {"judge": "logistic regression on 8x8-pooled train digits", "judge_test_accuracy": round(test_acc, 4),
           "sampler": sampler, "n_samples": len(labels)}
    for guidance in guidances:
        imgs = samples(guidance)
        key = f"g{guidance:g}"
        if out_of_range:
            out[f"out_of_range_fraction_{key}"] = round(float((imgs.abs() > 1.05).float().mean()), 5)
        imgs = imgs.clamp(-1, 1)
        pred = clf.predict(F.avg_pool2d(imgs, 2).flatten(1).numpy())
        out[f"cfg_accuracy_{key}"] = round(float((pred == labels.numpy()).mean()), 4)
        if _bundled("features-digits"):
            out[f"features_digits_accuracy_{key}"] = measurement_dict(metrics.class_accuracy(imgs, labels, feature="features-digits"))
            out[f"fd_features_digits_{key}"] = measurement_dict(metrics.frechet_distance(imgs, "train", feature="features-digits"))
    return out


def digits_cond(model, progress, guidances=(1.0, 2.0, 3.0)):
    """:func:`digits_class_quality` of 500 class-guided DDIM samples (50 per class) at each guidance scale."""
    labels = torch.arange(10).repeat_interleave(50)
    return digits_class_quality(lambda g: ddim_samples(model, len(labels), steps=50, guidance=g, class_labels=labels, seed=1),
                                labels, "DDIM, 50 steps, trailing spacing", guidances)


def noisy_classifier(model, progress):
    """Test accuracy of a noise-aware classifier on test digits noised to t = 0 ... 999."""
    sched = DDPMScheduler.from_config(TRAIN_SCHEDULE)
    x, y = data.digits(16, "test")
    g = torch.Generator().manual_seed(7)
    acc = {}
    with torch.no_grad():
        for t in (0, 100, 250, 500, 750, 999):
            x_t = sched.add_noise(x, torch.randn(x.shape, generator=g), torch.full((x.shape[0],), t))
            acc[str(t)] = round(float((model(x_t, t).argmax(1) == y).float().mean()), 4)
    return {"test_accuracy_by_t": acc, "n_test": int(x.shape[0])}


def autoencoder(vae, progress):
    """Reconstruction error (MSE, PSNR) of the autoencoder on the shapes test images."""
    x, _ = data.shapes("test", 32)
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x[i : i + 250]).latent_dist.mean).sample for i in range(0, len(x), 250)])
    mse = float(F.mse_loss(rec.clamp(-1, 1), x))
    return {"test_mse": round(mse, 6), "test_psnr_db": round(10 * math.log10(4.0 / mse), 2), "n_test": int(x.shape[0])}


def super_resolution(model, progress):
    """PSNR, low-resolution consistency and FD of a super-resolution stage on 2x2-pooled real test images,
    beside bilinear upsampling of the same images."""
    x, _ = data.shapes("test", 32)
    x = x[:SHAPES_EVAL_SAMPLES]
    low = F.avg_pool2d(x, 2)
    sr = ddim_samples(model, len(x), steps=SHAPES_EVAL_STEPS, cond=low, seed=1).clamp(-1, 1)
    up = F.interpolate(low, size=32, mode="bilinear", align_corners=False).clamp(-1, 1)

    def psnr(a):
        return round(10 * math.log10(4.0 / float(F.mse_loss(a, x))), 2)

    out = {"sampler": f"DDIM, {SHAPES_EVAL_STEPS} steps, from 2x2-pooled real test images", "n_test": len(x),
           "psnr_db": psnr(sr), "bilinear_psnr_db": psnr(up),
           "lowres_consistency_mse": round(float(F.mse_loss(F.avg_pool2d(sr, 2), low)), 6)}
    if _bundled("features-shapes"):
        out["fd_features_shapes"] = measurement_dict(metrics.frechet_distance(sr, "train", feature="features-shapes"))
        out["fd_features_shapes_bilinear"] = measurement_dict(metrics.frechet_distance(up, "train", feature="features-shapes"))
    return out


SHAPES_JUDGE = "judge-shapes"  # held-out classifier only; the shapes metrics measure in features-shapes


def as_low_resolution(images: torch.Tensor, size: int) -> torch.Tensor:
    """32x32 images as a ``size``-pixel model's upsampled output is compared: 2x2 (4x4, ...) pooled, then bilinearly
    upsampled back to 32, so only the model's own errors count."""
    return F.interpolate(F.avg_pool2d(images, 32 // size), size=32, mode="bilinear", align_corners=False)


def shapes_judge(images: torch.Tensor, *, size: int = 32, seed: int = 0) -> dict:
    """What the held-out judge (the ``judge-shapes`` classifier, trained on the train split) makes of shapes images.

    ``judge_test_accuracy``: its accuracy on the 1000 real *test* images, whose labels are known (how good a judge
    it is). ``class_share_distance``: :func:`companion.metrics.class_share_distance` of ``images`` from those test
    images (an unconditional model has no requested class to score accuracy against). ``size`` < 32: the images
    come from a model of that resolution, upsampled to 32; the test images go through the same 2x2 pooling and
    upsampling. ``confident_share`` / ``real_confident_share``: :func:`companion.metrics.confident_share` of
    ``images`` / of the test images (how often the judge is sure what it sees: generated images carry no label, so
    its accuracy on them cannot be measured; how sure it is can). ``shares`` / ``real_shares``: how often it finds
    each class of :data:`companion.data.SHAPES_CLASSES` in ``images`` / in the test images.
    """
    real, labels = data.shapes("test", 32)
    if size != 32:
        real = as_low_resolution(real, size)
    _, real_logits, _ = metrics.extract(real, SHAPES_JUDGE)
    _, logits, _ = metrics.extract(images, SHAPES_JUDGE)
    return {"judge_test_accuracy": metrics.accuracy_from_logits(real_logits, labels, SHAPES_JUDGE, seed=seed),
            "class_share_distance": metrics.class_share_distance(logits, real_logits, SHAPES_JUDGE, seed=seed),
            "confident_share": metrics.confident_share(logits, SHAPES_JUDGE, seed=seed),
            "real_confident_share": metrics.confident_share(real_logits, SHAPES_JUDGE, seed=seed),
            "shares": metrics.class_shares(logits), "real_shares": metrics.class_shares(real_logits)}


def shapes_samples(model, progress):
    """FD of 300 DDIM samples to the shapes train set in the features-shapes space (lower is better).

    16x16 models are compared after bilinear upsampling to 32x32, with a reference set that went through
    the same 2x2 pooling and upsampling, so only the model's errors count.
    """
    imgs = ddim_samples(model, SHAPES_EVAL_SAMPLES, steps=SHAPES_EVAL_STEPS, seed=1)
    out = {"sampler": f"DDIM, {SHAPES_EVAL_STEPS} steps", "n_samples": SHAPES_EVAL_SAMPLES,
           "out_of_range_fraction": round(float((imgs.abs() > 1.05).float().mean()), 5)}
    imgs = imgs.clamp(-1, 1)
    real, _ = data.shapes("train", 32)
    size = model.image_shape[-1]
    if size != 32:
        imgs = F.interpolate(imgs, size=32, mode="bilinear", align_corners=False)
        real = as_low_resolution(real, size)
    if _bundled("features-shapes"):
        ref = "train" if size == 32 else metrics.reference("features-shapes", images=real)
        out["fd_features_shapes"] = measurement_dict(metrics.frechet_distance(imgs, ref, feature="features-shapes"))
        if _bundled(SHAPES_JUDGE):
            judged = shapes_judge(imgs, size=size)
            out["judge"] = f"{SHAPES_JUDGE} classifier (held-out: test split)"
            for key in ("judge_test_accuracy", "class_share_distance", "confident_share", "real_confident_share"):
                out[key if key.startswith("judge") else f"judge_{key}"] = measurement_dict(judged[key])
            out["judge_class_shares"] = {"classes": list(data.SHAPES_CLASSES), "generated": judged["shares"],
                                         "real_test": judged["real_shares"]}
    else:  # colour statistics only (mean and std per channel, 6-d) until features-shapes is bundled
        def stats(a):
            return torch.cat([a.mean(dim=(2, 3)), a.std(dim=(2, 3))], 1).double()

        ref = metrics.Reference("colour statistics (6-d)", "train", stats(real), None)
        out["fd_colour_stats_6d"] = round(metrics.fd_from_features(stats(imgs), ref).value, 5)
    return out


@torch.no_grad()
def student(model, progress):
    """FD (features-digits, 500 samples, 50 per class) and class accuracy at the student's own step count."""
    kw = student_sampling(model)
    labels = torch.arange(10).repeat_interleave(50)
    imgs = torch.cat([sample(model, **kw, seed=1 + i, batch=100, class_labels=labels[j : j + 100]).images
                      for i, j in enumerate(range(0, len(labels), 100))]).clamp(-1, 1)
    return {"sampler": f"{kw['sampler']}, {kw['steps']} step(s)", "n_samples": len(labels),
            "fd_features_digits": measurement_dict(metrics.frechet_distance(imgs, "train", feature="features-digits")),
            "features_digits_accuracy": measurement_dict(metrics.class_accuracy(imgs, labels, feature="features-digits"))}

