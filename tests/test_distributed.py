"""Merges shared out between processes: ``torchrun -m ctm_kernels merge`` on 2 CPU ranks (gloo)
and ``ctm_kernels.merge`` under a process group write what one process writes, byte for byte,
and an error on one rank fails every rank with nothing left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ctm_kernels
from ctm_kernels.io import open_adapter
from ctm_kernels.options import DEFAULT_GROUP_BYTES
from ctm_kernels.pipeline.plan import plan_groups, plan_modules
from ctm_kernels.pipeline.ranks import Ranks

ROOT = Path(ctm_kernels.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.synth import SynthSpec, generate  # noqa: E402

# ranks 8 and 16 mixed, DARE + TIES: seeded per module, so the masks must not depend on the rank
MERGE_ARGS = ["--rank", "8", "--method", "dare_ties", "--p", "0.3", "--seed", "1", "--top-k", "0.5"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "tiny", SynthSpec(layout="tiny", adapters=3, ranks=(8, 16)))


def _env():
    # one thread per process everywhere (torchrun's default): the same arithmetic in both runs
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _ctm(argv, nproc=1, timeout=120):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return subprocess.run([*launch, "-m", "ctm_kernels", *argv], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)


def test_torchrun_two_ranks_writes_the_single_process_bytes(tiny_set, tmp_path):
    adapters = list(map(str, tiny_set))
    one = _ctm(["merge", *adapters, *MERGE_ARGS, "-o", str(tmp_path / "one"), "--report", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr
    two = _ctm(["merge", *adapters, *MERGE_ARGS, "-o", str(tmp_path / "two"), "--report", str(tmp_path / "two.json")],
               nproc=2)
    assert two.returncode == 0, two.stderr
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "one.json", "two", "two.json"]   # no part files left
    assert two.stdout.count("merged 3 adapters into 14 modules") == 1      # rank 0 alone prints
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert r1["stats"]["world_size"] == 1 and r2["stats"]["world_size"] == 2
    for key in ("groups", "modules", "bytes_read"):
        assert r1["stats"][key] == r2["stats"][key], key
    assert r2["energy_kept"] == r1["energy_kept"]
    assert len(load_file(str(tmp_path / "two" / "adapter_model.safetensors"))) == 2 * 14


def _group_of_rank(adapters, rank, world=2):
    opened = [open_adapter(a) for a in adapters]
    groups = plan_groups(plan_modules(opened), DEFAULT_GROUP_BYTES)
    sizes = [sum(s.nbytes for e in g for _, s in e.specs) for g in groups]
    ranks = Ranks()
    ranks.world, ranks.rank = world, rank
    return groups[ranks.share(sizes)[0]]


def test_torchrun_failure_on_one_rank_fails_all(tiny_set, tmp_path):
    # a NaN in a module that rank 1 merges: headers are fine, so only rank 1 finds it
    adapters = [tmp_path / "in" / p.name for p in tiny_set]
    for src, dst in zip(tiny_set, adapters):
        dst.mkdir(parents=True)
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    name = _group_of_rank(adapters, 1)[0].name
    weights = adapters[1] / "adapter_model.safetensors"
    sd = load_file(str(weights))
    key = f"base_model.model.{name}.lora_A.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, str(weights), metadata={"format": "pt"})
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    proc = _ctm(["merge", *map(str, adapters), *MERGE_ARGS, "-o", str(out_dir / "merged")], nproc=2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ctm:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("ctm: error: rank 1: ") and f"{weights}: {key}: factor contains NaN" in errors[0]
    assert list(out_dir.iterdir()) == []


def _worker(rank, world, init_file, adapters, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        kw = dict(rank=8, method="dare_ties", p=0.3, seed=1, top_k=0.5)
        alone = ctm_kernels.merge(adapters, distributed=False, **kw)
        shared = ctm_kernels.merge(adapters, **kw)
        assert shared.stats.world_size == world and alone.stats.world_size == 1
        assert shared.stats.groups == alone.stats.groups and shared.stats.bytes_read == alone.stats.bytes_read
        for a, b in zip(alone.modules, shared.modules):           # every rank gets every module
            assert a.name == b.name and torch.equal(a.A, b.A) and torch.equal(a.B, b.B), a.name
        written = ctm_kernels.merge(adapters, output=Path(out_dir) / "shared", **kw)
        assert written.energy_kept == alone.energy_kept
        # merge returns on every rank once the output is in place
        assert (Path(out_dir) / "shared" / "adapter_model.safetensors").is_file()
        if rank == 0:
            alone.save(Path(out_dir) / "alone")
        with pytest.raises(ValueError, match="distributed must be None, True or False"):
            ctm_kernels.merge(adapters, distributed="yes", **kw)
    finally:
        dist.destroy_process_group()


def test_python_api_under_a_process_group(tiny_set, tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), list(map(str, tiny_set)), str(tmp_path)), nprocs=2)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "alone" / f).read_bytes() == (tmp_path / "shared" / f).read_bytes(), f


def test_distributed_true_needs_a_process_group(tiny_set):
    with pytest.raises(ValueError, match="distributed=True needs an initialised torch.distributed process group"):
        ctm_kernels.merge(list(map(str, tiny_set)), rank=8, distributed=True)


class _TwoRanks:
    """torch.distributed as rank ``rank`` of two sees it, the other rank's objects given."""

    def __init__(self, rank, other_gathered=None, rank0_broadcast=None):
        self.rank, self.other, self.rank0 = rank, other_gathered, rank0_broadcast

    def get_world_size(self):
        return 2

    def get_rank(self):
        return self.rank

    def all_gather_object(self, out, obj):
        out[self.rank], out[1 - self.rank] = obj, self.other

    def broadcast_object_list(self, box, src):
        if self.rank != src:
            box[0] = self.rank0


def test_one_failure_protocol_for_every_step():
    # a step on every rank: results by rank; another rank's failure raised here, naming it
    assert Ranks(_TwoRanks(1, (None, "zero"))).together(lambda: "one") == ["zero", "one"]
    with pytest.raises(ValueError, match=r"^rank 0: bad input$"):
        Ranks(_TwoRanks(1, (("value", "bad input"), None))).together(lambda: "one")
    with pytest.raises(RuntimeError, match=r"^rank 0: OSError: disk full$"):
        Ranks(_TwoRanks(1, (("internal", "OSError: disk full"), None))).together(lambda: "one")

    def boom():
        raise KeyError("own")

    with pytest.raises(KeyError, match="own"):          # this rank's own error, as itself
        Ranks(_TwoRanks(0, (None, "one"))).together(boom)
    # a step on rank 0 alone: its result, or its error, on every rank
    assert Ranks(_TwoRanks(1, rank0_broadcast=(None, "parts"))).first(boom) == "parts"
    with pytest.raises(ValueError, match=r"^rank 0: no room$"):
        Ranks(_TwoRanks(1, rank0_broadcast=(("value", "no room"), None))).first(lambda: "never")
    with pytest.raises(KeyError, match="own"):
        Ranks(_TwoRanks(0)).first(boom)
    assert Ranks().first(lambda: 3) == 3 and Ranks().together(lambda: 4) == [4]
