"""The forgetting monitor: a cheap retention probe inside SFT and GRPO training (a ``TrainerCallback``).

Every ``monitor_every`` optimizer steps (and before the first step, and after the last) the model is scored on
three fixed, small sets (``monitor_size`` items each, offline, see :mod:`peft_arena.data.probes`):

* ``monitor/general_nll``: mean per-token negative log-likelihood of the first BoolQ validation passages
  (general text, at most 128 tokens each, no chat template); ``monitor/general_nll_rise_pct`` is its rise in %
  over the probe before the first step (the base model plus an untrained adapter);
* ``monitor/general_mc_acc``: ARC-Easy validation items scored by log-likelihood (the option whose tokens have
  the highest summed log-probability after ``Question: …\\nAnswer:``, lm-eval's ``acc``), in %;
  ``monitor/general_mc_gold_prob`` is the gold option's probability renormalised over the four options, in %
  (a smooth version of the accuracy);
* ``monitor/target_nll``: the target-side proxy next to them, the mean per-token NLL of the reference answers
  of held-out training-distribution records of the run's domain (prompted exactly as the run trains: the SFT chat
  turn, or the GRPO prompt with its boxing instruction); ``monitor/target_nll_drop_pct`` is its drop in %.

Held-out target records are records of the training source that the run does not train on. When the source has
fewer spare records than ``monitor_size`` (the bundled samples), the monitor holds out
``min(monitor_size, n // 4)`` records of the training subset instead, and the run says so
(``arena.monitor.target_heldout``).

``forgetting_budget=B`` (percent, 0 = none) stops training at the first probe whose general NLL rose more than
B % over the first probe (tags ``arena.monitor.stopped_early=true`` and ``arena.monitor.stop_reason``, and the run
description). At every probe point the trainable tensors are checkpointed to
``<output_dir>/monitor/step-NNNNNN.safetensors`` (the run's local working folder, which the training stage removes
once the adapter is logged; their steps and scores stay in ``monitor/probes.json``). ``monitor_select=pareto``
then restores, before the adapter is
saved, the probe point chosen on the target/general Pareto front (both NLLs minimised; the probe before training
is not a candidate):

1. with a budget: the front point with the lowest target NLL among those within the budget (if none is, the one
   with the smallest general rise);
2. without one: the front point nearest to the ideal corner after min-max scaling both NLLs over the front
   (ties: the later step).

``monitor_select=last`` (the default) keeps the weights as training left them. Only the trainable tensors are
restored: AdaLoRA's final rank pattern is the one training ended with. Under several processes every rank runs the
probe (the forward may be sharded) and only the main process logs and writes checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SELECT_CHOICES = ("last", "pareto")
PROBE_TABLE = "monitor/probes.json"
TEXT_TOKENS = 128  # tokens per general-text passage
BATCH = 4  # sequences per probe forward


@dataclass
class MonitorSettings:
    every: int  # probe every N optimizer steps
    budget: float  # stop when the general NLL rose more than this many % (0 = no budget)
    select: str  # last | pareto
    size: int  # items per probe set

    @classmethod
    def from_config(cls, cfg) -> "MonitorSettings | None":
        every, budget = int(cfg.monitor_every), float(cfg.forgetting_budget)
        select, size = str(cfg.monitor_select), int(cfg.monitor_size)
        if every < 0:
            raise ValueError(f"monitor_every must be >= 0 (0 = no monitor), got {every}")
        if select not in SELECT_CHOICES:
            raise ValueError(f"monitor_select must be one of {', '.join(SELECT_CHOICES)}, got {select!r}")
        if budget < 0 or math.isnan(budget):
            raise ValueError(f"forgetting_budget is a rise of the general NLL in % (> 0, 0 = none), got {budget}")
        if not every:
            if budget or select != "last":
                raise ValueError("forgetting_budget and monitor_select=pareto need the monitor: set monitor_every > 0")
            return None
        if size < 1:
            raise ValueError(f"monitor_size must be >= 1, got {size}")
        return cls(every, budget, select, size)


def attach_monitor(cfg, records: list[dict], tracker, output_dir: str | Path, *, train: str, domain: str,
                   source: str, seed: int = 0) -> tuple[list[dict], list]:
    """``(training records, callbacks)``: the records the run trains on (fewer when the monitor had to hold some
    out) and ``[ForgettingMonitor]``, or ``(records, [])`` when ``cfg.monitor_every`` is 0."""
    settings = MonitorSettings.from_config(cfg)
    if settings is None:
        return records, []
    from peft_arena.data import load_records

    used = {r["question"] for r in records}
    spare = [r for r in load_records(source, domain, seed=seed) if r["question"] not in used]
    if len(spare) >= settings.size:
        heldout, note = spare[: settings.size], f"{settings.size} records of {source} not trained on"
    else:
        k = min(settings.size, len(records) // 4)
        if k < 1:
            raise ValueError(f"the forgetting monitor needs held-out {domain} records: {source} has none beyond the "
                             f"{len(records)} the run trains on; raise limit/add data or set monitor_every=0")
        records, heldout = records[:-k], records[-k:]
        note = (f"{k} of the {len(records) + k} training records of {source} held out (training uses "
                f"{len(records)}): the source has no spare records")
        print(f"[peft-arena] forgetting monitor: {note}", file=sys.stderr)
    if train == "grpo" and not all(r.get("answer") for r in heldout):
        raise ValueError("the forgetting monitor's target proxy scores reference answers, and the held-out GRPO "
                         "records have none; use a source with worked answers or set monitor_every=0")
    tracker.set_tags({"arena.monitor.every": settings.every, "arena.monitor.target_heldout": note,
                      "arena.monitor.select": settings.select,
                      **({"arena.monitor.budget_pct": settings.budget} if settings.budget else {})})
    monitor = ForgettingMonitor(settings, heldout, domain, train, tracker, Path(output_dir) / "monitor")
    return records, [monitor]


# ------------------------------------------------------------------------------------------------ probe sets


def target_pairs(tokenizer, records: list[dict], domain: str, train: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each record, prompted as the run trains (SFT turn or GRPO prompt)."""
    from peft_arena.data.schema import rl_prompt_text
    from peft_arena.training.sft import tokenize_example

    pairs = []
    for r in records:
        question = rl_prompt_text(r["question"], domain) if train == "grpo" else r["question"]
        pairs.append(tokenize_example(tokenizer, question, r["answer"]))
    return pairs


@dataclass
class ProbeSets:
    text: list[tuple[list[int], int]]  # (ids, first scored position)
    choice: list[list[tuple[list[int], int]]]  # per item, one sequence per option
    gold: list[int]
    target: list[tuple[list[int], int]]

    @classmethod
    def build(cls, tokenizer, heldout: list[dict], domain: str, train: str, size: int) -> "ProbeSets":
        from peft_arena.data.probes import general_choices, general_texts

        text = []
        for passage in general_texts(size):
            ids = tokenizer(passage, add_special_tokens=True)["input_ids"][:TEXT_TOKENS]
            if len(ids) >= 2:
                text.append((ids, 1))
        choice, gold = [], []
        for item in general_choices(size):
            prompt = tokenizer(f"Question: {item['question']}\nAnswer:", add_special_tokens=True)["input_ids"]
            options = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in item["choices"]]
            choice.append([(prompt + o, len(prompt)) for o in options])
            gold.append(item["gold"])
        target = [(p + a, len(p)) for p, a in target_pairs(tokenizer, heldout, domain, train)]
        return cls(text, choice, gold, target)


@torch.no_grad()
def score_sequences(model, seqs: list[tuple[list[int], int]], pad_id: int) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each sequence's tokens from its first scored position on."""
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for i in range(0, len(seqs), BATCH):
        chunk = seqs[i:i + BATCH]
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scored = torch.zeros((len(chunk), length), dtype=torch.bool)
        for j, (seq, start) in enumerate(chunk):
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
            scored[j, max(start, 1): len(seq)] = True
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        keep = scored[:, 1:]
        sums = (logprobs * keep).sum(-1)
        counts = keep.sum(-1)
        out += [(float(s), int(c)) for s, c in zip(sums.cpu(), counts.cpu())]
    return out


def run_probe(model, sets: ProbeSets, pad_id: int) -> dict[str, float]:
    """The probe's raw numbers for ``model`` as it is now (eval mode for the forward, training mode restored)."""
    was_training = model.training
    model.eval()
    try:
        text = score_sequences(model, sets.text, pad_id)
        target = score_sequences(model, sets.target, pad_id)
        flat = [seq for options in sets.choice for seq in options]
        scores = score_sequences(model, flat, pad_id)
    finally:
        model.train(was_training)
    correct, gold_prob = 0, 0.0
    for k, gold in enumerate(sets.gold):
        option = torch.tensor([s for s, _ in scores[4 * k: 4 * k + 4]])
        correct += int(option.argmax().item() == gold)
        gold_prob += torch.softmax(option, 0)[gold].item()
    n = max(len(sets.gold), 1)
    return {
        "general_nll": -sum(s for s, _ in text) / max(sum(c for _, c in text), 1),
        "general_mc_acc": 100.0 * correct / n,
        "general_mc_gold_prob": 100.0 * gold_prob / n,
        "target_nll": -sum(s for s, _ in target) / max(sum(c for _, c in target), 1),
    }


# ------------------------------------------------------------------------------------------------ selection


def pareto_probes(probes: list[dict]) -> list[dict]:
    """Probe points (after the first step) that no other one beats on both NLLs (lower is better)."""
    pts = [p for p in probes if p["step"] > 0]
    front = []
    for p in pts:
        dominated = any(q["target_nll"] <= p["target_nll"] and q["general_nll"] <= p["general_nll"]
                        and (q["target_nll"] < p["target_nll"] or q["general_nll"] < p["general_nll"]) for q in pts)
        if not dominated:
            front.append(p)
    return front


def select_probe(probes: list[dict], budget: float) -> dict | None:
    """The probe point the module docstring's rule picks (None when no probe ran after a step)."""
    front = pareto_probes(probes)
    if not front:
        return None
    if budget:
        within = [p for p in front if p["general_nll_rise_pct"] <= budget]
        if within:
            return min(within, key=lambda p: (p["target_nll"], -p["step"]))
        return min(front, key=lambda p: (p["general_nll_rise_pct"], -p["step"]))

    def scaled(key: str, p: dict) -> float:
        lo, hi = min(q[key] for q in front), max(q[key] for q in front)
        return 0.0 if hi == lo else (p[key] - lo) / (hi - lo)

    return min(front, key=lambda p: (math.hypot(scaled("target_nll", p), scaled("general_nll", p)), -p["step"]))


# ------------------------------------------------------------------------------------------------ callback


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class ForgettingMonitor(_callback_base()):
    """Probes at step 0, every ``settings.every`` steps and at the end; budget stop; Pareto selection."""

    def __init__(self, settings: MonitorSettings, heldout: list[dict], domain: str, train: str, tracker,
                 checkpoint_dir: Path) -> None:
        self.settings, self.heldout, self.domain, self.train = settings, heldout, domain, train
        self.tracker, self.checkpoint_dir = tracker, Path(checkpoint_dir)
        self.sets: ProbeSets | None = None
        self.pad_id = 0
        self.probes: list[dict] = []
        self.checkpoints: dict[int, Path] = {}
        self.stopped: str | None = None
        self.selected: dict | None = None

    # -- events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        tokenizer = processing_class if processing_class is not None else kwargs.get("tokenizer")
        if tokenizer is None:
            raise RuntimeError("the forgetting monitor needs the trainer's tokenizer (processing_class)")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.sets = ProbeSets.build(tokenizer, self.heldout, self.domain, self.train, self.settings.size)
        self._probe(model, state, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.settings.every == 0:
            self._probe(model, state, control)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.probes or self.probes[-1]["step"] != state.global_step:
            self._probe(model, state, control, final=True)
        if self.settings.select == "pareto":
            self.selected = select_probe(self.probes, self.settings.budget)
            if self.selected is not None:
                self._restore(model, self.selected["step"])
        self._finish(state)

    # -- work
    def _probe(self, model, state, control, final: bool = False) -> None:
        started = time.perf_counter()
        raw = run_probe(model, self.sets, self.pad_id)
        first = self.probes[0] if self.probes else raw
        point = {"step": int(state.global_step), **raw,
                 "general_nll_rise_pct": 100.0 * (raw["general_nll"] / first["general_nll"] - 1.0),
                 "target_nll_drop_pct": 100.0 * (1.0 - raw["target_nll"] / first["target_nll"]),
                 "general_mc_delta_pp": raw["general_mc_acc"] - first["general_mc_acc"],
                 "probe_seconds": time.perf_counter() - started}
        self.probes.append(point)
        if state.is_world_process_zero:
            self.tracker.log_metrics({f"monitor/{k}": v for k, v in point.items() if k != "step"}, step=point["step"])
            if point["step"] > 0:
                self._checkpoint(model, point["step"])
        budget = self.settings.budget
        if budget and not final and point["general_nll_rise_pct"] > budget and self.stopped is None:
            self.stopped = (f"forgetting budget reached at step {point['step']}: general NLL rose "
                            f"{point['general_nll_rise_pct']:.2f}% > {budget:g}% (monitor/general_nll "
                            f"{first['general_nll']:.4f} -> {raw['general_nll']:.4f})")
            print(f"[peft-arena] {self.stopped}; stopping training", file=sys.stderr)
            control.should_training_stop = True

    def _checkpoint(self, model, step: int) -> None:
        from safetensors.torch import save_file

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step-{step:06d}.safetensors"
        save_file({n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters()
                   if p.requires_grad}, str(path))
        self.checkpoints[step] = path

    def _restore(self, model, step: int) -> None:
        from safetensors.torch import load_file

        if step not in self.checkpoints:  # every rank but the main one (no files): nothing to restore here
            return
        saved = load_file(str(self.checkpoints[step]))
        params = dict(model.named_parameters())
        missing = sorted(set(saved) - set(params))
        if missing:
            raise RuntimeError(f"monitor checkpoint of step {step} names tensors the model lacks: {missing[:3]}")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        print(f"[peft-arena] monitor_select=pareto: the saved adapter is the one of step {step}", file=sys.stderr)

    def _finish(self, state) -> None:
        if not state.is_world_process_zero:
            return
        front_steps = {p["step"] for p in pareto_probes(self.probes)}
        rows = [{**p, "on_front": p["step"] in front_steps,
                 "selected": self.selected is not None and p["step"] == self.selected["step"]} for p in self.probes]
        self.tracker.log_dict({"settings": vars(self.settings), "sources": _provenance(), "probes": rows,
                               "stopped_early": self.stopped, "selected_step": self.selected and self.selected["step"],
                               "checkpoints": {str(k): str(v) for k, v in self.checkpoints.items()}}, PROBE_TABLE)
        tags = {"arena.monitor.probes": len(self.probes), "arena.monitor.stopped_early": str(bool(self.stopped)).lower()}
        if self.stopped:
            tags["arena.monitor.stop_reason"] = self.stopped
            tags["mlflow.note.content"] = f"Stopped early by the forgetting monitor: {self.stopped}."
        if self.settings.select == "pareto":
            tags["arena.monitor.selected_step"] = self.selected["step"] if self.selected else "none (no probe after a step)"
        self.tracker.set_tags(tags)


def _provenance() -> dict:
    from peft_arena.data.probes import PROVENANCE

    return dict(PROVENANCE, target="held-out records of the training source (arena.monitor.target_heldout)")
