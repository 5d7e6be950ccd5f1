"""The merge pipeline: plan -> read -> merge -> write, each stage a module with one job.

* :mod:`.plan`: open the adapters (headers and configs), validate, choose a rank per module,
  group same-shape modules under a memory budget. Reads no factor; it is the dry run.
* :mod:`.read`: one group's factors at a time, the next group read ahead on a thread.
* :mod:`.merge`: one group through the engine as one batched problem.
* :mod:`.write`: the merged tensors into one atomic output as their groups finish.

:func:`~.run.execute` runs a plan's groups through the other three stages once; :mod:`.ranks` is
the only place that shares work between ``torch.distributed`` ranks, :mod:`.launch` starts them
under torchrun. The Python API
(:func:`ctm_kernels.merge`), the ``ctm`` command and the PEFT integration are faces over
:func:`~.plan.make_plan` and :func:`~.run.execute`.

The package imports torch only when one of its names is used, so that the command line can
read :func:`.launch.launched_ranks` before it knows whether it needs torch.
"""
from importlib import import_module

_EXPORTS = {"make_plan": "plan", "MergePlan": "plan", "execute": "run", "MergeResult": "result",
            "MergeStats": "result"}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
