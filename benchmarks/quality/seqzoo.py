"""Two LoRA zoos that look like real LoRA use: a small transformer and rank-16 adapters.

``python -m benchmarks.quality.seqzoo [--zoos seq seq_families] [--seeds 0 1 2]`` trains them
again (seeded) into ``benchmarks/quality/zoo_seq[_families]/seed<k>/``. Both have

* the base: a 2-block pre-LayerNorm transformer encoder (d_model 128, 4 heads, MLP 256,
  learned positions) with ONE output head over a vocabulary of 64 symbols, pre-trained on
  copy and ``ciphers`` substitution ciphers, each announced by its own task token
  (``cipher_i``: a fixed random permutation of the 64 symbols, applied to each of 8 symbols);
* then one rank-16 LoRA (alpha 32) per new task on q, k, v, o and the two MLP matrices of both
  blocks (12 modules), trained with base, embeddings and head frozen: the head and vocabulary
  are shared, so no task has parameters of its own outside the merged modules;
* eight new tasks built from dialects: ``dialect_j`` is ``cipher_j`` with the outputs of 32 of
  the 64 symbols (a fixed random subset) rotated among themselves, asked for with
  ``cipher_j``'s own token. Each adapter specialises skills the base has (as real adapters
  adapt a model to a domain it half knows): the base scores about 50% on a task, its adapter
  100%. Tasks use disjoint tokens, so a merged model can tell them apart.

The two zoos differ in how much each task asks:

* ``seq`` (8 ciphers, about 3 minutes of CPU per seed): task ``dialect_i``, one dialect. Its
  updates need 6.4-6.5 directions for 90% of their energy, the first holding 40-41%.
* ``seq_families`` (48 ciphers, about 6 minutes of CPU per seed): task ``family_i``, six
  dialects (``dialect_{6 i}`` .. ``dialect_{6 i + 5}``; a sequence of the family is one of them),
  so each adapter makes 6 x 32 symbol changes under six tokens and its update uses most of its
  rank: 8.5-8.8 directions, the first holding 25-26%.

Files: ``base.safetensors`` (fp16; rounded before the adapters train, so the stored base is the
trained-on one), ``adapters.safetensors`` (``<task>.<module>.lora_A [16, in]`` and
``.lora_B [out, 16]``, fp16), ``manifest.json`` (configuration, per-task accuracies, the
adapters' effective ranks). Accuracy is per output token (8 per sequence).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .merging import update_spectrum

HERE = Path(__file__).resolve().parent
SYMBOLS, LENGTH = 64, 8
MAX_CIPHERS, DIALECT_CHANGES = 48, 32    # ciphers of the larger zoo; symbols a dialect remaps


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# fixed tables (seeded by the task's number, not by the zoo seed): every zoo seed pre-trains the
# same ciphers and trains adapters for the same dialects
CIPHER_TABLES = [torch.randperm(SYMBOLS, generator=_seeded(77 + i)) for i in range(MAX_CIPHERS)]


def _dialect_table(i: int) -> torch.Tensor:
    changed = torch.randperm(SYMBOLS, generator=_seeded(300 + i))[:DIALECT_CHANGES]
    source = torch.arange(SYMBOLS)
    source[changed] = changed.roll(1)          # changed[k] takes changed[k - 1]'s output
    return CIPHER_TABLES[i][source]


DIALECT_TABLES = [_dialect_table(i) for i in range(MAX_CIPHERS)]


def _table(task: str) -> torch.Tensor:
    """``[64]``: the output symbol of each input symbol under copy, a cipher or a dialect."""
    kind, _, number = task.partition("_")
    if task == "copy":
        return torch.arange(SYMBOLS)
    if kind == "cipher" and number.isdigit() and int(number) < MAX_CIPHERS:
        return CIPHER_TABLES[int(number)]
    if kind == "dialect" and number.isdigit() and int(number) < MAX_CIPHERS:
        return DIALECT_TABLES[int(number)]
    raise ValueError(f"seqzoo.py: unknown task {task!r}")


def target(task: str, x: torch.Tensor) -> torch.Tensor:
    """The output symbols ``[N, 8]`` of ``task`` (copy, a cipher or a dialect) for input
    symbols ``x [N, 8]``."""
    return _table(task)[x]


def task_token(task: str) -> int:
    """The token that announces ``task``: ``SYMBOLS`` for copy, ``SYMBOLS + 1 + i`` for
    ``cipher_i`` (pre-training task number ``1 + i``); a dialect is asked for with its cipher's
    token."""
    _table(task)                                 # unknown tasks raise
    return SYMBOLS if task == "copy" else SYMBOLS + 1 + int(task.partition("_")[2])


def batch(tasks: str | list[str], n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random sequences of a task, or of several taken in turn (row ``j`` is
    ``tasks[j mod len(tasks)]``): tokens ``[n, 9]`` (task token, 8 symbols), targets ``[n, 8]``."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    x = torch.randint(0, SYMBOLS, (n, LENGTH), generator=g)
    which = torch.arange(n) % len(tasks)
    tokens = torch.tensor([task_token(t) for t in tasks])[which]
    y = torch.stack([_table(t) for t in tasks])[which[:, None], x]
    return torch.cat([tokens[:, None], x], 1), y


@dataclass
class SeqConfig:
    """One zoo's configuration; the defaults are the ``seq`` zoo (see ``ZOOS``)."""
    ciphers: int = 8                    # pre-training ciphers, one token each
    family_size: int = 1                # dialects per adapter task
    d_model: int = 128
    heads: int = 4
    mlp: int = 256
    blocks: int = 2
    rank: int = 16
    alpha: float = 32.0
    pretrain_steps: int = 3000          # every pre-training task reaches 100% token accuracy (9 or 49 tasks)
    pretrain_lr: float = 2e-3
    pretrain_per_task: int = 7          # sequences of each pre-training task per step
    adapter_steps: int = 800
    adapter_lr: float = 3e-3
    batch_size: int = 64
    eval_size: int = 128          # sequences per task in each of val and test
    seed: int = 0
    tasks: list[str] | None = None      # None: every task of the zoo (``lora_tasks``)

    def __post_init__(self):
        if not 1 <= self.ciphers <= MAX_CIPHERS:
            raise ValueError(f"seqzoo.py: ciphers must be in [1, {MAX_CIPHERS}], got {self.ciphers}")
        if self.family_size < 1 or self.ciphers % self.family_size:
            raise ValueError(f"seqzoo.py: {self.ciphers} ciphers do not make families of {self.family_size}")
        # a list of its own: dataclasses.replace passes the old config's list along
        self.tasks = list(self.lora_tasks if self.tasks is None else self.tasks)

    @property
    def pretrain_tasks(self) -> tuple[str, ...]:
        return ("copy",) + tuple(f"cipher_{i}" for i in range(self.ciphers))

    @property
    def vocab(self) -> int:
        return SYMBOLS + len(self.pretrain_tasks)     # the symbols, then one token per pre-training task

    @property
    def lora_tasks(self) -> tuple[str, ...]:
        """``dialect_i`` (families of one), else ``family_i``."""
        kind = "dialect" if self.family_size == 1 else "family"
        return tuple(f"{kind}_{i}" for i in range(self.ciphers // self.family_size))

    def members(self, task: str) -> list[str]:
        """The dialects a task's sequences are drawn from: ``family_i`` is dialects
        ``family_size * i`` .. ``family_size * (i + 1) - 1``."""
        if task.startswith("family_"):
            i = int(task.removeprefix("family_"))
            return [f"dialect_{self.family_size * i + j}" for j in range(self.family_size)]
        return [task]

    @property
    def lora_layers(self) -> list[str]:
        return [f"b{i}.{m}" for i in range(self.blocks) for m in ("q", "k", "v", "o", "up", "down")]


# the committed zoos: name -> configuration (its seed replaced per trained zoo); files in zoo_dir(name)
ZOOS = {"seq": SeqConfig(),
        "seq_families": SeqConfig(ciphers=48, family_size=6, eval_size=192)}    # 32 sequences per dialect


def zoo_dir(name: str) -> Path:
    return HERE / f"zoo_{name}"


class SeqModel(nn.Module):
    """Token ids ``[N, 9]`` -> symbol logits ``[N, 8, 64]`` at positions 1..8; every Linear of
    the blocks is addressed by name (``b0.q`` ...) so dense updates can be added to it."""

    def __init__(self, cfg: SeqConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(LENGTH + 1, d))
        self.lin = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        for i in range(cfg.blocks):
            for m in ("q", "k", "v", "o"):
                self.lin[f"b{i}_{m}"] = nn.Linear(d, d)
            self.lin[f"b{i}_up"] = nn.Linear(d, cfg.mlp)
            self.lin[f"b{i}_down"] = nn.Linear(cfg.mlp, d)
            self.norms[f"b{i}_attn"] = nn.LayerNorm(d)
            self.norms[f"b{i}_mlp"] = nn.LayerNorm(d)
        self.final = nn.LayerNorm(d)
        self.head = nn.Linear(d, SYMBOLS)

    def _linear(self, name: str, x: torch.Tensor, deltas) -> torch.Tensor:
        layer = self.lin[name.replace(".", "_")]
        weight = layer.weight if deltas is None or name not in deltas else layer.weight + deltas[name]
        return nn.functional.linear(x, weight, layer.bias)

    def forward(self, tokens: torch.Tensor, deltas: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        N, S = tokens.shape
        h = self.embed(tokens) + self.pos[:S]
        H, dh = self.cfg.heads, self.cfg.d_model // self.cfg.heads
        for i in range(self.cfg.blocks):
            a = self.norms[f"b{i}_attn"](h)
            q, k, v = (self._linear(f"b{i}.{m}", a, deltas).reshape(N, S, H, dh).transpose(1, 2) for m in "qkv")
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v
            h = h + self._linear(f"b{i}.o", att.transpose(1, 2).reshape(N, S, -1), deltas)
            m = self.norms[f"b{i}_mlp"](h)
            h = h + self._linear(f"b{i}.down", nn.functional.gelu(self._linear(f"b{i}.up", m, deltas)), deltas)
        return self.head(self.final(h))[:, 1:]


@dataclass
class SeqAdapter:
    task: str
    A: dict[str, torch.Tensor]      # module -> [rank, in]
    B: dict[str, torch.Tensor]      # module -> [out, rank]
    scaling: float

    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: self.scaling * self.B[n] @ self.A[n] for n in self.A}


@dataclass
class SeqZoo:
    config: SeqConfig
    model: SeqModel
    adapters: list[SeqAdapter]
    stats: dict


def token_accuracy(model: SeqModel, deltas, tokens: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(tokens, deltas).argmax(-1) == y).float().mean().item()


def eval_sets(cfg: SeqConfig, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed val and test sequences of ``task``, seeded by the task's position in ``cfg.tasks``,
    not by the zoo seed: the three seeds of a zoo are measured on the same sequences."""
    g = torch.Generator().manual_seed(10_000 + cfg.tasks.index(task))
    return {"val": batch(cfg.members(task), cfg.eval_size, g), "test": batch(cfg.members(task), cfg.eval_size, g)}


def _train(params, loss_fn, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        sched.step()


def pretrain(cfg: SeqConfig) -> SeqModel:
    torch.manual_seed(cfg.seed)
    model = SeqModel(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    def loss():
        tok, y = zip(*(batch(t, cfg.pretrain_per_task, g) for t in cfg.pretrain_tasks))
        logits = model(torch.cat(tok))
        return nn.functional.cross_entropy(logits.reshape(-1, SYMBOLS), torch.cat(y).reshape(-1))

    _train(list(model.parameters()), loss, cfg.pretrain_steps, cfg.pretrain_lr)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())        # the stored fp16 base is the trained-on base
            p.requires_grad_(False)
    return model


def train_adapter(model: SeqModel, cfg: SeqConfig, task: str, seed: int) -> SeqAdapter:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for name in cfg.lora_layers:
        layer = model.lin[name.replace(".", "_")]
        A[name] = nn.Parameter(torch.empty(cfg.rank, layer.in_features))
        nn.init.kaiming_uniform_(A[name], a=math.sqrt(5))
        B[name] = nn.Parameter(torch.zeros(layer.out_features, cfg.rank))
    scaling = cfg.alpha / cfg.rank

    def loss():
        tok, y = batch(cfg.members(task), cfg.batch_size, g)
        logits = model(tok, {n: scaling * B[n] @ A[n] for n in A})
        return nn.functional.cross_entropy(logits.reshape(-1, SYMBOLS), y.reshape(-1))

    _train(list(A.values()) + list(B.values()), loss, cfg.adapter_steps, cfg.adapter_lr)
    # stored in fp16 (a few MB per zoo); the rounded factors are the adapter that is evaluated
    return SeqAdapter(task, {n: a.detach().half().float() for n, a in A.items()},
                      {n: b.detach().half().float() for n, b in B.items()}, scaling)


def effective_rank(adapters: list[SeqAdapter], energy: float = 0.9) -> dict:
    """Per module update ``dW_t``: directions needed for ``energy`` of ``||dW_t||^2`` and the
    share of its first direction, averaged over adapters and modules (min and max too)."""
    needed, first = zip(*(update_spectrum(dW, energy) for a in adapters for dW in a.deltas().values()))
    return {"energy": energy, "directions_mean": sum(needed) / len(needed), "directions_min": min(needed),
            "directions_max": max(needed), "first_share_mean": sum(first) / len(first), "first_share_max": max(first)}


def train_zoo(cfg: SeqConfig, log=print) -> SeqZoo:
    t0 = time.process_time()
    model = pretrain(cfg)
    log(f"seed {cfg.seed}: base pre-trained ({time.process_time() - t0:.0f} s CPU)")
    adapters, stats = [], {"tasks": {}}
    for i, task in enumerate(cfg.tasks):
        adapter = train_adapter(model, cfg, task, 1000 * (cfg.seed + 1) + i)
        sets = eval_sets(cfg, task)
        stats["tasks"][task] = {"adapter_test": token_accuracy(model, adapter.deltas(), *sets["test"]),
                                "base_test": token_accuracy(model, None, *sets["test"])}
        adapters.append(adapter)
        log(f"  {task:13s} adapter {stats['tasks'][task]['adapter_test']:5.1f}  base {stats['tasks'][task]['base_test']:5.1f}")
    stats["effective_rank"] = effective_rank(adapters)
    stats["cpu_seconds"] = time.process_time() - t0
    log(f"seed {cfg.seed}: effective rank {stats['effective_rank']}, {stats['cpu_seconds']:.0f} s CPU")
    return SeqZoo(cfg, model, adapters, stats)


def save_zoo(zoo: SeqZoo, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in zoo.model.state_dict().items()}, str(path / "base.safetensors"))
    tensors = {}
    for a in zoo.adapters:
        for n in a.A:
            tensors[f"{a.task}.{n}.lora_A"] = a.A[n].half().contiguous()
            tensors[f"{a.task}.{n}.lora_B"] = a.B[n].half().contiguous()
    save_file(tensors, str(path / "adapters.safetensors"))
    cfg = asdict(zoo.config)
    (path / "manifest.json").write_text(json.dumps({"config": cfg, "stats": zoo.stats}, indent=2) + "\n")


def load_zoo(path: Path) -> SeqZoo:
    manifest = json.loads((path / "manifest.json").read_text())
    cfg = SeqConfig(**manifest["config"])
    model = SeqModel(cfg)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path / "base.safetensors")).items()})
    model.requires_grad_(False)
    tensors = load_file(str(path / "adapters.safetensors"))
    adapters = [SeqAdapter(t, {n: tensors[f"{t}.{n}.lora_A"].float() for n in cfg.lora_layers},
                           {n: tensors[f"{t}.{n}.lora_B"].float() for n in cfg.lora_layers}, cfg.alpha / cfg.rank)
                for t in cfg.tasks]
    return SeqZoo(cfg, model, adapters, manifest["stats"])


class SeqEvaluator:
    """Token accuracies of the shared head on one set of merged updates (the interface of
    ``digits.Evaluator``, so the same search runs on both zoos)."""

    def __init__(self, zoo: SeqZoo):
        self.zoo = zoo
        self.sets = [eval_sets(zoo.config, a.task) for a in zoo.adapters]
        self.individual = {part: [token_accuracy(zoo.model, a.deltas(), *s[part]) for a, s in zip(zoo.adapters, self.sets)]
                           for part in ("val", "test")}

    def accuracies(self, deltas, part: str) -> list[float]:
        return [token_accuracy(self.zoo.model, deltas, *s[part]) for s in self.sets]

    def normalised(self, accs: list[float], part: str) -> list[float]:
        return [100.0 * acc / ind for acc, ind in zip(accs, self.individual[part])]

    def val_scores(self, updates: dict[str, torch.Tensor], lambdas) -> list[float]:
        out = []
        for lam in lambdas:
            accs = self.accuracies({n: lam * M for n, M in updates.items()}, "val")
            out.append(sum(self.normalised(accs, "val")) / len(accs))
        return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoos", nargs="+", choices=sorted(ZOOS), default=sorted(ZOOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="parent folder (default: next to this file)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.zoos:
        folder = zoo_dir(name) if args.out is None else args.out / f"zoo_{name}"
        for seed in args.seeds:
            save_zoo(train_zoo(replace(ZOOS[name], seed=seed)), folder / f"seed{seed}")


if __name__ == "__main__":
    main()
