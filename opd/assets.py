"""Built-in demo assets: an addition teacher, a weak student, and the prompts they are run on.

`make demo` distills with nothing downloaded, so what it needs is trained here, on the CPU,
the first time it is asked for, and cached under `cache_dir/addition-v2/`:

    addition-teacher/     Qwen2, 3 layers, hidden 128 (0.48M params), trained to >= 90% greedy
                          accuracy (it reaches 100%)
    addition-student/     Qwen2, 3 layers, hidden 128, half the MLP (0.33M params), SFT'd only
                          until it writes the format, stops, and gets >= 10% right (it lands
                          around 10-20%: one phase transition in its learning curve)
    addition/train.jsonl  5000 prompts (`prompt`, `answer`) for on-policy rollouts
    addition/eval.jsonl   256 held-out prompts, none of which is in train
    meta.json             measured accuracies, parameter counts, build times and recipes

Why this shape: on-policy distillation needs a teacher that is clearly right and a student
that is clearly wrong but already on format, so the demo shows accuracy climbing from the
student's start toward the teacher's within minutes. The two share one tokenizer (digits one
per token), so the same-vocabulary path is what the demo exercises; they differ in MLP width, so
nothing relies on the models matching. The student has the capacity to solve the task (it is only
under-trained), so the gap is one distillation can close: with the recipe's SFT run to the end
(1500 steps) this student reaches 100% greedy accuracy, where a 2-layer student (hidden 128) tops
out at 88% and one with the teacher's MLP width at 61%; the depth is what the carries need. Operands have 2-3
digits (both the same length): carries chain across columns, yet the teacher learns it in
about 1200 small steps. The task and its scratchpad format are described in
`opd.tasks.addition`.

Only the first call builds: under a minute on an idle 2-core machine (teacher ~30 s, student
~10 s; measured 2026-12-01), longer on a busy one; later calls return the cached paths.
The whole set is built as one unit in a temp dir and moved into place with `os.replace`,
under an `fcntl.flock`, so concurrent processes neither build twice nor see a half-written
set. Everything is seeded; rebuilding gives the same prompts, and the same models on the
same hardware. Should other hardware's numerics leave the teacher short of its target, it
gets up to two short extra training phases before the build fails loudly.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from opd import pretrained, qwen
from opd.catalog import ADDITION, BUILTINS
from opd.tasks import addition
from opd.tiny import TinySpec

VERSION = ADDITION
MIN_DIGITS, MAX_DIGITS = 2, 3
TRAIN_SIZE, EVAL_SIZE = 5000, 256
TEACHER_MIN_ACCURACY = 0.9
TEACHER_TOP_UPS = 2
"""Extra short training phases allowed if the teacher misses its target (other hardware, other numerics)."""
MAX_NEW_TOKENS = 48
SEED = 1234


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: AdamW, linear warmup then cosine decay, fresh random problems each step."""

    spec: TinySpec
    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int | None = None
    """Greedy eval accuracy is measured (and printed) every this many steps."""
    stop_at_accuracy: float | None = None
    """Stop at the first eval that reaches this accuracy: what keeps the student weak."""


# max_positions stays at TinySpec's 256: vLLM refuses a max_model_len (default 256) above the checkpoint's.
TEACHER = Recipe(
    TinySpec(layers=3, hidden=128, heads=4, kv_heads=2, intermediate=256),
    steps=1200,
    batch_size=16,
    lr=2e-3,
    eval_every=400,
)
STUDENT = Recipe(
    TinySpec(layers=3, hidden=128, heads=4, kv_heads=2, intermediate=128),
    steps=1000,
    batch_size=16,
    lr=3e-3,
    seed=1,
    eval_every=25,
    stop_at_accuracy=0.1,
)


def ensure_builtin(name: str, cache_dir: str | Path) -> Path:
    """Path of built-in asset `name` (a key of opd.catalog.BUILTINS), building its whole set on first use."""
    if name not in BUILTINS:
        raise KeyError(f"unknown built-in {name!r}; expected one of {sorted(BUILTINS)}")
    entry = BUILTINS[name]
    root = ensure_set(entry.group, Path(cache_dir).expanduser())
    return root / entry.path


def ensure_set(group: str, cache_dir: Path) -> Path:
    """`cache_dir/group`, built by its builder in a temp dir and moved into place unless already there."""
    root = cache_dir / group
    if not (root / "meta.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with open(cache_dir / f".{group}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"[opd.assets] waiting for another process to finish building {root}", flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)  # then finds the finished set below
            if not (root / "meta.json").is_file():
                for stale in cache_dir.glob(f".{group}-*"):  # left by a builder that was killed
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{group}-", dir=cache_dir))
                tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
                try:
                    print(f"[opd.assets] building built-in set {group} in {root} (first use only)", flush=True)
                    BUILDERS[group](tmp)
                    if root.exists():  # incomplete (no meta.json): not something this code wrote
                        shutil.rmtree(root)
                    os.replace(tmp, root)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return root


def build(out: str | Path, teacher: Recipe = TEACHER, student: Recipe = STUDENT) -> dict:
    """Build prompts, tokenizer, teacher and student into `out`; returns what it writes to meta.json."""
    import torch

    from opd.tiny import build_model, save_checkpoint, train_tokenizer

    out = Path(out)
    start = time.time()
    rng = random.Random(SEED)
    eval_rows = _unique_examples(rng, EVAL_SIZE, exclude=set())
    held_out = {r["prompt"] for r in eval_rows}
    train_rows = _unique_examples(rng, TRAIN_SIZE, exclude=held_out)
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        addition.write_jsonl(
            out / "addition" / f"{split}.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]
        )
    tokenizer = train_tokenizer([r["prompt"] + r["response"] for r in train_rows])
    meta: dict = {
        "version": VERSION,
        "digits": [MIN_DIGITS, MAX_DIGITS],
        "example": train_rows[0],
        "train_size": TRAIN_SIZE,
        "eval_size": EVAL_SIZE,
        "vocab_size": len(tokenizer),
        "torch_threads": torch.get_num_threads(),
    }
    for role, recipe in (("teacher", teacher), ("student", student)):
        t0 = time.time()
        model = build_model(tokenizer, recipe.spec, seed=recipe.seed)
        steps = train(model, tokenizer, recipe, role, held_out, eval_rows)
        result = evaluate(model, tokenizer, eval_rows)
        for i in range(TEACHER_TOP_UPS if role == "teacher" else 0):
            if result["accuracy"] >= TEACHER_MIN_ACCURACY:
                break
            print(f"[opd.assets] teacher at {result['accuracy']:.1%}, below target: training longer", flush=True)
            extra = replace(recipe, steps=recipe.steps // 4, lr=recipe.lr / 4, warmup=0, seed=recipe.seed + 100 + i)
            steps += train(model, tokenizer, extra, role, held_out, eval_rows)
            result = evaluate(model, tokenizer, eval_rows)
        print(f"[opd.assets] {role}: {_fmt(result)} after {steps} steps ({time.time() - t0:.0f}s)", flush=True)
        if role == "teacher" and result["accuracy"] < TEACHER_MIN_ACCURACY:
            raise RuntimeError(f"built-in teacher reached only {result['accuracy']:.1%} greedy accuracy")
        save_checkpoint(model, tokenizer, out / f"addition-{role}")
        meta[role] = {
            **result,
            "params": sum(p.numel() for p in model.parameters()),
            "steps": steps,
            "build_seconds": round(time.time() - t0, 1),
            "recipe": asdict(recipe),
        }
    meta["build_seconds"] = round(time.time() - start, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _unique_examples(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    rows, seen = [], set(exclude)
    while len(rows) < n:
        ex = addition.make_example(rng, MIN_DIGITS, MAX_DIGITS)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            rows.append(ex)
    return rows


def train(model, tokenizer, recipe: Recipe, role: str, held_out: set[str], eval_rows: list[dict]) -> int:
    """SFT on fresh random problems (never a held-out prompt); returns the number of steps taken.

    Loss is on the response and the eos after it, so the model learns to stop. `eval_rows` is
    only generated on (progress lines and the recipe's early stop), never trained on.
    """
    import torch

    rng = random.Random(SEED + 1 + recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, recipe.warmup)

    def lr_scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, recipe.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)
    model.train()
    t0, total, step, logged = time.time(), 0.0, 0, 0
    while step < recipe.steps:
        rows = []
        while len(rows) < recipe.batch_size:
            ex = addition.make_example(rng, MIN_DIGITS, MAX_DIGITS)
            if ex["prompt"] not in held_out:
                rows.append(ex)
        input_ids, labels = _sft_batch(tokenizer, rows)
        # Right padding under a causal mask: real tokens never see the pads, so no attention mask is needed.
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        total += loss.item()
        step += 1
        check = recipe.eval_every is not None and step % recipe.eval_every == 0
        if not (check or step % 100 == 0 or step == recipe.steps):
            continue
        line = f"[opd.assets] training {role}: step {step}/{recipe.steps} loss {total / (step - logged):.4f}"
        total, logged = 0.0, step
        if check:
            result = evaluate(model, tokenizer, eval_rows)
            model.train()
            line += f", {_fmt(result)}"
            if recipe.stop_at_accuracy is not None and result["accuracy"] >= recipe.stop_at_accuracy:
                print(f"{line} ({time.time() - t0:.0f}s): reached {recipe.stop_at_accuracy:.0%}, stopping", flush=True)
                break
        print(f"{line} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return step


def _sft_batch(tokenizer, rows: list[dict]):
    """Right-padded prompt+response+eos ids, and labels that are -100 except on the response and its eos."""
    import torch

    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
    seqs = [(p, [*r, tokenizer.eos_token_id]) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    return input_ids, labels


def generate_greedy(model, tokenizer, prompts: list[str], batch_size: int = 256) -> tuple[list[str], list[bool]]:
    """Greedy responses (special tokens dropped) and whether each ended with eos; KV-cached, left-padded batches."""
    import torch

    model.eval()
    texts: list[str] = []
    stopped: list[bool] = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i : i + batch_size], add_special_tokens=False)["input_ids"]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for j, x in enumerate(ids):
            input_ids[j, width - len(x) :] = torch.tensor(x)
            attention[j, width - len(x) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[:, width:]
        texts += tokenizer.batch_decode(gen, skip_special_tokens=True)
        stopped += (gen == tokenizer.eos_token_id).any(dim=1).tolist()
    return texts, stopped


def evaluate(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """Greedy accuracy on `rows`, plus how often the response is well-formed and ends with eos."""
    texts, stopped = generate_greedy(model, tokenizer, [r["prompt"] for r in rows])
    n = len(rows)
    return {
        "accuracy": sum(addition.marked_answer_correct(t, r["answer"]) for t, r in zip(texts, rows, strict=True)) / n,
        "well_formed": sum(addition.extract_answer(t) is not None for t in texts) / n,
        "stopped": sum(stopped) / n,
    }


def _fmt(result: dict[str, float]) -> str:
    return f"greedy accuracy {result['accuracy']:.1%} (well-formed {result['well_formed']:.1%})"


BUILDERS: dict[str, Callable[[Path], dict]] = {ADDITION: build, pretrained.SMOLLM2: pretrained.build, **qwen.BUILDERS}
"""How each set of opd.catalog is built into a directory (its meta.json written last)."""
