"""Stage 3, merge: one module group's factors through the engine as one batched problem."""
from __future__ import annotations

from ..engine import merge_checked_layers
from ..io.adapter import MergedModule, ModuleInfo
from .plan import MergePlan
from .read import LoadedGroup


def merge_group(plan: MergePlan, loaded: LoadedGroup) -> list[MergedModule]:
    """Merge one module group of ``plan`` from its factors (as :class:`.read.GroupReader` hands
    them over); returns the merged modules (CPU, stored layout) with what the merge did at each.

    A module that only some adapters adapt gets a zero update from the others. For ``mean``
    that zero counts: the rule divides by every adapter given (``rules.rule_mean``), so a
    module adapted by k of T adapters is merged with its weights times k / T, which turns the
    engine's mean over the k into the mean over all T (a common factor leaves the subspace
    and the share kept unchanged; the reported norms are divided back)."""
    group = plan.groups[loaded.index]
    settings = plan.settings
    T = len(plan.adapters)
    layers, shrink = [], []
    for mod in loaded.factors:
        k = len(mod)
        f = k / T if settings.method == "mean" else 1.0
        layers.append(([x.A for x in mod], [x.B for x in mod], [float(x.scale) for x in mod],
                       [float(plan.weights[x.adapter] * f) for x in mod]))
        shrink.append(f)
    # each module is identified by its position among all modules, so that its DARE mask is
    # the same whatever the group sizes (max_group_bytes) and whichever rank merges it
    first = plan.firsts[loaded.index]
    # the plan checked the settings and the reader the factors: the engine does not again
    out = merge_checked_layers(layers, list(range(first, first + len(layers))), rank=group[0].rank,
                               method=settings.method, params=settings.params, device=plan.device,
                               beta=settings.beta, scale=settings.scale, stop=settings.stop, tol=settings.tol,
                               max_iter=settings.max_iter)
    del layers
    merged = []
    for e, res, f in zip(group, out, shrink):
        spec = e.first
        A, B = res.A.detach().to("cpu"), res.B.detach().to("cpu")
        if spec.kind == "conv":
            A = A.reshape(A.shape[0], *spec.a_shape[1:])
            B = B.reshape(B.shape[0], B.shape[1], *spec.b_shape[2:])
        info = res.info
        merged.append(MergedModule(e.name, spec.kind, A, B, ModuleInfo(
            adapters=tuple(i for i, _ in e.specs), iterations=info.iterations, converged=info.converged,
            stopped_by=info.stopped_by, energy_kept=tuple(info.energy_kept),
            share_after_rule=tuple(res.share_after_rule), norms=tuple(nu / f for nu in info.norms))))
    return merged
