"""The base fingerprint's accept/refuse table (issue 34.4): which bases an adapter saved on base B loads onto.

A random BERT (hidden 128, 4 layers, byte-level vocabulary) is the base B. An adapter (``BitFitConfig(task_type=
"SEQ_CLS")``) is saved on it twice: with the format-3 fingerprint this branch writes, and with the same config
carrying a format-2 fingerprint (what bitfit-peft 0.2.0 wrote and checked: the first 16 values of each weight, no
embeddings). Each variant of B is then loaded with ``PeftModel.from_pretrained`` (the real load path):

* fp16 / bf16 copies of B (must be accepted);
* honest full fine-tunes of B (AdamW, lr 2e-5, batch 8, on the packaged SMS spam demo as bytes) after 10, 50 and
  200 steps, with their relative change ``||W_ft - W|| / ||W||`` over all parameters (must be refused);
* B with its last layer's weights replaced by another init's, except their first 16 values;
* B with its word and position embeddings replaced;
* a crafted copy: another init with B's biases and the first 16 values of each of B's weights copied in;
* B with every value moved by ~1 % (multiplicative noise);
* a random base of the same shapes.

It also times the fingerprint of B (what every load computes) in both formats.

    python benchmarks/fingerprint_table.py   # ~1 min on 2 CPU cores; writes results/cpu/fingerprint_table.json
"""

from __future__ import annotations

import copy
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import ensure_bitfit_importable, log

ensure_bitfit_importable()

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from bitfit_peft import BitFitConfig, BitFitError  # noqa: E402
from bitfit_peft.files.fingerprint import compute  # noqa: E402
from bitfit_peft.tuner.base_check import base_fingerprint, module_entries  # noqa: E402

OUT = Path(__file__).parent / "results" / "cpu" / "fingerprint_table.json"
DATA = Path(__file__).resolve().parents[1] / "src" / "bitfit_peft" / "data" / "sms_spam_demo.csv"
SEQ = 32
PREFIX = 16


def make_base(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=260, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=SEQ, num_labels=2)
    return BertForSequenceClassification(config).eval()


def batches(steps: int, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``steps`` batches of (input ids, mask, labels) from the SMS spam demo, bytes as tokens (cycled)."""
    with DATA.open(encoding="utf-8") as f:
        rows = [(r["text"], int(r["label"] == "spam")) for r in csv.DictReader(f)]
    out = []
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        ids = torch.zeros(batch, SEQ, dtype=torch.long)
        mask = torch.zeros(batch, SEQ, dtype=torch.long)
        for i, (text, _) in enumerate(chunk):
            raw = [min(b, 255) + 4 for b in text.encode("utf-8")[: SEQ - 2]]
            seq = [1, *raw, 2]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        out.append((ids, mask, torch.tensor([label for _, label in chunk])))
    return out


def fine_tune(base: torch.nn.Module, steps: int) -> tuple[torch.nn.Module, float]:
    """A full fine-tune of a copy of ``base``; returns it and its relative change over all parameters."""
    model = copy.deepcopy(base).train()
    optim = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    for ids, mask, labels in batches(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    before = torch.cat([p.detach().reshape(-1) for p in base.parameters()])
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return model.eval(), float((after - before).norm() / before.norm())


def replaced(base: torch.nn.Module, keep: str) -> torch.nn.Module:
    """``base`` with the tensors selected by ``keep`` taken from another init (their first 16 values kept)."""
    out, other = copy.deepcopy(base), make_base(seed=99)
    with torch.no_grad():
        for (name, param), (_, new) in zip(out.named_parameters(), other.named_parameters(), strict=True):
            if keep == "last layer" and ".layer.3." in name and param.dim() == 2:
                first = param.detach().reshape(-1)[:PREFIX].clone()
                param.copy_(new)
                param.view(-1)[:PREFIX] = first
            elif keep == "embeddings" and name.endswith(("word_embeddings.weight", "position_embeddings.weight")):
                param.copy_(new)
    return out


def crafted(base: torch.nn.Module) -> torch.nn.Module:
    """Another init with ``base``'s biases and the first 16 values of each of its weights copied in."""
    out = make_base(seed=77)
    with torch.no_grad():
        for (name, src), (_, dst) in zip(base.named_parameters(), out.named_parameters(), strict=True):
            if name.endswith("bias"):
                dst.copy_(src)
            else:
                dst.view(-1)[:PREFIX] = src.reshape(-1)[:PREFIX]
    return out


def moved(base: torch.nn.Module, fraction: float) -> torch.nn.Module:
    out = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in out.parameters():
            param.mul_(1 + fraction * torch.randn(param.shape, generator=gen))
    return out


def accepted(variant: torch.nn.Module, folder: Path) -> bool:
    try:
        PeftModel.from_pretrained(copy.deepcopy(variant), folder)
    except BitFitError as err:
        assert "different base model" in str(err), err
        return False
    return True


def main() -> None:
    torch.set_num_threads(1)
    base = make_base(seed=0)
    peft_model = get_peft_model(copy.deepcopy(base), BitFitConfig(task_type="SEQ_CLS"))
    names = sorted(peft_model.base_model.bitfit_layers())
    work = Path(tempfile.mkdtemp())
    folders = {"format 3 (this branch)": work / "v3", "format 2 (0.2.0 / main)": work / "v2"}
    peft_model.save_pretrained(folders["format 3 (this branch)"])
    peft_model.save_pretrained(folders["format 2 (0.2.0 / main)"])
    config_path = folders["format 2 (0.2.0 / main)"] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_fingerprint"] = compute(module_entries(peft_model, names, version=2), version=2)
    config_path.write_text(json.dumps(config))

    variants: dict[str, tuple[torch.nn.Module, str]] = {
        "fp16 copy": (base.half(), "accept"),
        "bf16 copy": (make_base(seed=0).bfloat16(), "accept"),
    }
    base = make_base(seed=0)
    for steps in (10, 50, 200):
        start = time.perf_counter()
        tuned, change = fine_tune(base, steps)
        log(f"fine-tune {steps} steps: relative change {change:.4%} ({time.perf_counter() - start:.0f} s)")
        variants[f"honest fine-tune, {steps} steps (change {change:.2%})"] = (tuned, "refuse")
    variants["last layer replaced (first 16 values kept)"] = (replaced(base, "last layer"), "refuse")
    variants["embeddings replaced"] = (replaced(base, "embeddings"), "refuse")
    variants["crafted copy (biases + first 16 weight values)"] = (crafted(base), "refuse")
    variants["every value moved ~1 %"] = (moved(base, 0.01), "refuse")
    variants["random base"] = (make_base(seed=5), "refuse")

    rows = []
    for label, (variant, want) in variants.items():
        row = {"base": label, "wanted": want}
        for fmt_name, folder in folders.items():
            row[fmt_name] = "accept" if accepted(variant, folder) else "refuse"
        rows.append(row)
        log(f"{label:55s} wanted {want:6s}  " + "  ".join(f"{k}: {row[k]}" for k in folders))

    timings = {}
    for version in (2, 3):
        def run(v: int = version) -> None:
            if v == 3:
                base_fingerprint(peft_model, names)
            else:
                compute(module_entries(peft_model, names, version=2), version=2)
        run()
        start = time.perf_counter()
        for _ in range(20):
            run()
        timings[f"format {version} ms per fingerprint"] = round((time.perf_counter() - start) / 20 * 1000, 2)
    log(timings)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": "random BERT, hidden 128, 4 layers, vocab 260 (bytes), SEQ_CLS; CPU fp32",
              "parameters": sum(p.numel() for p in base.parameters()), "rows": rows, "timings": timings,
              "python": sys.version.split()[0], "torch": torch.__version__}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {OUT}")


if __name__ == "__main__":
    main()
