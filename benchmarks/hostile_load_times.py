"""Time to refuse each oversized adapter input, before (another checkout's ``src``) and after (this one) (issue 34.1).

Inputs, each a copy of a valid tiny-BERT adapter folder with one file replaced:

* ``header 300k``: ``adapter_model.safetensors`` declaring 300,000 zero-size tensors (a ~17 MB header, no data),
  loaded through ``PeftModel.from_pretrained``, ``hotswap_adapter`` and the serving engine's ``add_adapter``;
* ``layers_to_transform 10M``: an ``adapter_config.json`` whose ``layers_to_transform`` lists 10,000,000 integers
  (``PeftModel.from_pretrained``);
* ``config nested 200k``: an ``adapter_config.json`` of 200,000 nested brackets (``PeftModel.from_pretrained``).

Each (input, path, checkout) runs in a fresh subprocess (``PYTHONPATH=<src>``); the figure is the wall time of the
load call alone, and what it raised. A load that is not refused in ``--timeout`` seconds counts as such.

    python benchmarks/hostile_load_times.py --before /work/main/src     # writes results/cpu/hostile_load_times.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "cpu" / "hostile_load_times.json"
CASES = [("header 300k", "from_pretrained"), ("header 300k", "hotswap"), ("header 300k", "engine"),
         ("layers_to_transform 10M", "from_pretrained"), ("config nested 200k", "from_pretrained")]

_SETUP = textwrap.dedent(
    """
    import json, shutil, struct, sys
    from pathlib import Path
    import torch
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    import bitfit_peft

    def base():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, num_labels=2)
        return BertForSequenceClassification(cfg).eval()

    root = Path(sys.argv[1])
    if not (root / "good").exists():
        get_peft_model(base(), bitfit_peft.BitFitConfig(task_type="SEQ_CLS")).save_pretrained(root / "good")
        base().save_pretrained(root / "base")
        vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *"abcdefghij"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                sep_token="[SEP]").save_pretrained(root / "base")
        for name, make in {
            "header 300k": lambda f: (f / "adapter_model.safetensors").write_bytes(
                (lambda raw: struct.pack("<Q", len(raw)) + raw)(("{" + ",".join(
                    f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(300_000)) + "}"
                ).encode())),
            "layers_to_transform 10M": lambda f: (f / "adapter_config.json").write_text(
                json.dumps({**json.loads((f / "adapter_config.json").read_text()), "layers_to_transform": [0]})
                .replace('"layers_to_transform": [0]', '"layers_to_transform": [' + "0," * 9_999_999 + "0]")),
            "config nested 200k": lambda f: (f / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000),
        }.items():
            shutil.copytree(root / "good", root / name)
            make(root / name)
    """
)

_RUN = textwrap.dedent(
    """
    import time
    from peft import PeftModel
    case, path = sys.argv[2], sys.argv[3]
    folder = root / case
    if path == "engine":
        from bitfit_peft.serving.engine import MultiTaskEngine
        engine = MultiTaskEngine(str(root / "base"), device="cpu")
        call = lambda: engine.add_adapter("task", folder)
    elif path == "hotswap":
        model = PeftModel.from_pretrained(base(), root / "good")
        call = lambda: bitfit_peft.hotswap_adapter(model, str(folder), "default", torch_device="cpu")
    else:
        call = lambda: PeftModel.from_pretrained(base(), folder)
    start = time.perf_counter()
    try:
        call()
        raised = None
    except BaseException as err:
        raised = f"{type(err).__module__}.{type(err).__name__}: {' '.join(str(err).split())[:160]}"
    print(json.dumps({"seconds": round(time.perf_counter() - start, 3), "raised": raised}))
    """
)


def run(src: str, root: Path, case: str, path: str, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": src, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _SETUP + _RUN, str(root), case, path], capture_output=True,
                              text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "raised": f"not refused within {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"seconds": None, "raised": f"crashed: {proc.stderr.strip().splitlines()[-1:]}"[:300]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="/work/main/src", help="src folder of the checkout to compare with")
    parser.add_argument("--after", default=str(REPO / "src"))
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    env = {**os.environ, "PYTHONPATH": args.before}  # an adapter (fingerprint format) both checkouts read
    subprocess.run([sys.executable, "-c", _SETUP, str(root)], env=env, check=True, capture_output=True)
    rows = []
    for case, path in CASES:
        row = {"input": case, "path": path}
        for label, src in (("before", args.before), ("after", args.after)):
            row[label] = run(src, root, case, path, args.timeout)
        rows.append(row)
        print(f"{case:26s} {path:16s} before {row['before']['seconds']} s  after {row['after']['seconds']} s  "
              f"({row['before']['raised']} | {row['after']['raised']})", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"before": args.before, "after": args.after, "rows": rows,
                               "note": "CPU, 2 cores shared with other jobs; one run each (fresh process)"},
                              indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
