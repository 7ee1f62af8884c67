"""GPU correctness checks that CI (CPU only) cannot run. Writes a JSON report.

Run on a CUDA machine from the repo root: ``PYTHONPATH=src python benchmarks/gpu_checks.py --out $OUT``.
Checks: init equality and mixed-batch equivalence on CUDA (fp32 and bf16 autocast), the low-memory mode
(bf16 base, fp32 deltas) training step, the low-memory mode against naive bias training on a bf16 base (same
logits, gradients and dispatched ops under CUDA autocast), a GPU+CPU ``device_map`` split, and ``torch.compile``
(inductor): the raw model, and the documented in-place pattern with single-adapter and mixed batches (recompiles
counted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import bitfit_peft
from bitfit_peft import BitFitConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = BertConfig(
    vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, num_labels=3
)


def base(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(CFG).eval()
    with torch.no_grad():  # non-zero biases, like a pretrained model
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model


def batch(device: str, n: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (n, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def randomize(model, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(f".bitfit_delta.{adapter}"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def check_cuda_equivalence() -> dict:
    dev = DEVICE
    b = batch(dev)
    with torch.no_grad():
        ref = base().to(dev)(**b).logits
        model = get_peft_model(base(), BitFitConfig(task_type="SEQ_CLS"), adapter_name="task_a").to(dev).eval()
        init_equal = torch.equal(model(**b).logits, ref)
        model.add_adapter("task_b", BitFitConfig(task_type="SEQ_CLS"))
        randomize(model, "task_a", 1)
        randomize(model, "task_b", 2)
        model.set_adapter("task_a")
        out_a = model(**b).logits
        model.set_adapter("task_b")
        out_b = model(**b).logits
        names = ["task_a", "task_b", "__base__", "task_b", "task_a", "__base__"]
        mixed = model(**b, adapter_names=names).logits
        singles = {"task_a": out_a, "task_b": out_b, "__base__": ref}
        fp32_diff = max((mixed[i] - singles[n][i]).abs().max().item() for i, n in enumerate(names))
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            mixed16 = model(**b, adapter_names=names).logits.float()
        bf16_diff = max((mixed16[i] - singles[n][i]).abs().max().item() for i, n in enumerate(names))
    return {"init_equal": init_equal, "mixed_fp32_max_abs_diff": fp32_diff, "mixed_bf16_max_abs_diff": bf16_diff,
            "ok": init_equal and fp32_diff <= 1e-5 and bf16_diff <= 5e-2}  # fmt: skip


def check_lowmem_training() -> dict:
    model = get_peft_model(base(), BitFitConfig(task_type="SEQ_CLS")).to(DEVICE).train()
    bitfit_peft.cast_frozen_base(model, torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = batch(DEVICE)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    losses = []
    for _ in range(20):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**b, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    dtypes = {str(p.dtype) for n, p in model.named_parameters() if p.requires_grad}
    return {"losses_first_last": [losses[0], losses[-1]], "trainable_dtypes": sorted(dtypes),
            "ok": losses[-1] < losses[0] and dtypes == {"torch.float32"}}  # fmt: skip


def check_lowmem_vs_naive_bf16_base() -> dict:
    """bf16 frozen base + fp32 deltas vs naive bias training with the base in bf16, under CUDA autocast: the
    naive model's trainable biases are set to ``b0 + delta`` so both compute the same function."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import CountOps

    ours = get_peft_model(base(), BitFitConfig(task_type="SEQ_CLS")).to(DEVICE).eval()
    randomize(ours, "default", 5)
    naive = base().to(DEVICE).eval()
    with torch.no_grad():
        for name, layer in ours.base_model.bitfit_layers("default").items():
            target = naive.get_submodule(name.removeprefix("model."))
            target.bias.copy_(layer.original_bias() + layer.delta_of("default"))
        naive.classifier.load_state_dict(ours.base_model.model.classifier.modules_to_save["default"].state_dict())
    for name, param in naive.named_parameters():
        param.requires_grad_(name.endswith("bias") or name.startswith("classifier."))
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    bitfit_peft.cast_frozen_base(ours, torch.bfloat16)
    b = batch(DEVICE)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    results = {}
    for key, model in (("naive", naive), ("bitfit", ours)):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            model(**b, labels=labels)  # warm-up (cached casts)
            counter = CountOps()
            with counter:
                out = model(**b, labels=labels)
        out.loss.backward()
        grads = {n.split(".bitfit_delta")[0].removeprefix("base_model.model."): p.grad.float()
                 for n, p in model.named_parameters() if p.grad is not None and "bitfit_delta" in n}  # fmt: skip
        if key == "naive":
            grads = {n.removesuffix(".bias"): p.grad.float() for n, p in model.named_parameters()
                     if p.grad is not None and n.endswith(".bias") and not n.startswith("classifier")}  # fmt: skip
        results[key] = (out.logits.float(), grads, counter.ops)
    logits_diff = (results["naive"][0] - results["bitfit"][0]).abs().max().item()
    common = set(results["naive"][1]) & set(results["bitfit"][1])
    grad_diff = max((results["naive"][1][k] - results["bitfit"][1][k]).abs().max().item() for k in common)
    extra = results["bitfit"][2] - results["naive"][2]
    missing = results["naive"][2] - results["bitfit"][2]
    return {"logits_max_abs_diff": logits_diff, "grad_max_abs_diff": grad_diff, "grads_compared": len(common),
            "extra_ops": dict(extra), "missing_ops": dict(missing),
            "ok": logits_diff <= 1e-2 and grad_diff <= 1e-2 and not missing
            and set(extra) <= {"aten._foreach_add"}}  # fmt: skip


def check_compile_in_place_mixed() -> dict:
    """``model.get_base_model().compile()`` (inductor): single and mixed calls equal eager; recompiles counted."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = get_peft_model(base(), BitFitConfig(task_type="SEQ_CLS"), adapter_name="a").to(DEVICE).eval()
    model.add_adapter("b", BitFitConfig(task_type="SEQ_CLS"))
    model.add_adapter("c", BitFitConfig(task_type="SEQ_CLS"))
    for i, name in enumerate("abc"):
        randomize(model, name, 10 + i)
    b = batch(DEVICE)
    mixes = [["a", "b", "c", "a", "b", "c"], ["c", "c", "a", "b", "a", "b"], ["b", "a", "c", "c", "b", "a"]]
    with torch.no_grad():
        eager_single = model(**b).logits
        eager_mixed = [model(**b, adapter_names=m).logits for m in mixes]
        torch._dynamo.reset()
        counters.clear()
        model.get_base_model().compile()
        single = model(**b).logits
        mixed = [model(**b, adapter_names=m).logits for m in mixes]
        graphs = counters["stats"]["unique_graphs"]
        mixed_again = [model(**b, adapter_names=m).logits for m in mixes]
        graphs_after = counters["stats"]["unique_graphs"]
    pairs = [(single, eager_single), *zip(mixed + mixed_again, eager_mixed * 2, strict=True)]
    diff = max((x - y).abs().max().item() for x, y in pairs)
    torch._dynamo.reset()
    return {"max_abs_diff": diff, "unique_graphs": graphs, "new_graphs_on_repeat": graphs_after - graphs,
            "graph_breaks": dict(counters["graph_break"]), "ok": diff <= 1e-3 and graphs_after == graphs}  # fmt: skip


def check_device_map_split() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base().save_pretrained(f"{tmp}/base")
        model = get_peft_model(base(), BitFitConfig(task_type="SEQ_CLS"))
        randomize(model, "default", 3)
        model.save_pretrained(f"{tmp}/adapter")
        b_cpu = batch("cpu")
        with torch.no_grad():
            expected = PeftModel.from_pretrained(base(), f"{tmp}/adapter")(**b_cpu).logits
        device_map = {"bert.embeddings": 0, "bert.encoder.layer.0": 0, "bert.encoder.layer.1": 0,
                      "bert.encoder.layer.2": "cpu", "bert.encoder.layer.3": "cpu", "bert.pooler": "cpu",
                      "dropout": "cpu", "classifier": "cpu"}  # fmt: skip
        split = BertForSequenceClassification.from_pretrained(f"{tmp}/base", device_map=device_map)
        peft = PeftModel.from_pretrained(split, f"{tmp}/adapter").eval()
        devices = sorted({str(p.device) for n, p in peft.named_parameters() if "bitfit_delta" in n})
        with torch.no_grad():
            got = peft(**batch("cuda:0")).logits.float().cpu()
        diff = (got - expected).abs().max().item()
    # CPU-placed layers are offloaded by Accelerate (executed on the GPU), so their deltas sit on cuda:0 too
    return {"delta_devices": devices, "max_abs_diff": diff, "ok": diff <= 1e-4}


def check_compile() -> dict:
    model = get_peft_model(base(), BitFitConfig(task_type="SEQ_CLS")).to(DEVICE).eval()
    randomize(model, "default", 4)
    b = batch(DEVICE)
    with torch.no_grad():
        eager = model(**b).logits
        compiled = torch.compile(model.base_model.model)
        got = compiled(**b).logits
    diff = (got - eager).abs().max().item()
    return {"max_abs_diff": diff, "ok": diff <= 1e-3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"}
    for name, fn in [("cuda_equivalence", check_cuda_equivalence), ("lowmem_training", check_lowmem_training),
                     ("lowmem_vs_naive_bf16_base", check_lowmem_vs_naive_bf16_base),
                     ("device_map_split", check_device_map_split), ("compile", check_compile),
                     ("compile_in_place_mixed", check_compile_in_place_mixed)]:  # fmt: skip
        start = time.time()
        try:
            report[name] = fn()
        except Exception as err:  # report and continue: one GPU session, every result counts
            report[name] = {"ok": False, "error": repr(err), "trace": traceback.format_exc()[-2000:]}
        report[name]["seconds"] = round(time.time() - start, 2)
        print(name, json.dumps(report[name])[:400], flush=True)
    with open(os.path.join(args.out, "gpu_checks.json"), "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
