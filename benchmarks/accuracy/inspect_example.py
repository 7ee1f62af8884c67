"""Train one BitFit adapter (all biases) on a task and draw its bias-change heatmap (the paper's Fig. 1).

Example:
    $ python -m benchmarks.accuracy.inspect_example --task trec --steps 300      # ~5 min on 2 CPU cores
    $ bitfit-peft inspect out/bitfit-trec --plot docs/img/inspect_trec.png         # the same, from the CLI
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy import run as R  # noqa: E402

from bitfit_peft.bias_report import bias_change_report, plot_bias_heatmap  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="trec")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adapter-dir", type=Path, default=REPO / "out" / "bitfit-trec")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "inspect_trec.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    s = R.replace(R.SETTINGS["reduced"], min_steps=args.steps, max_steps=args.steps, dev_cap=None, test_cap=None)
    runner = R.Runner(s, torch.device("cpu"), Path("/dev/null"))
    d = runner.task(args.task)
    train = runner.encoded(args.task, "train", args.train_size)
    model, steps, loss, _ = R.train("bitfit", args.lr, 0, train, d.num_labels, s, torch.device("cpu"))
    dev = runner.evaluate(model, args.task, "dev")
    print(f"{args.task}: BitFit (all biases), lr {args.lr:g}, {steps} steps, loss {loss:.3f}, dev acc {dev:.4f}")
    model.save_pretrained(str(args.adapter_dir))
    report = bias_change_report(str(args.adapter_dir), base=R.model_path())
    title = f"BitFit on {args.task} (MiniLM-L6, {steps} steps, dev acc {100 * dev:.1f}%)"
    plot_bias_heatmap(report, args.plot, title=title)
    for kind, row in zip(report.kinds, report.grid(), strict=True):
        print(f"{kind:17s}", " ".join("   -   " if x != x else f"{x:.1e}" for x in row))
    print(f"adapter: {args.adapter_dir}  heatmap: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
