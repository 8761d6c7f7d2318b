"""Table 5 of the paper on any dataset: the full model against each ablation switch.

    python -m san_fast.ablation --out runs/ablation [any train.py flag, e.g. --epochs 4]

Runs one training per row with the same flags and seed, then writes ablation.md (a Markdown
table) and ablation.json into --out and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from san_fast.config import build_parser, resolve
from san_fast.engine import run
from san_fast.io_utils import atomic_write_json, atomic_write_text

# (row name, flags of that row): Table 5's rows, the full model last as in the paper.
ROWS = (
    ("w/o image reconstruction", {"no_reconstruction": True}),
    ("w/o batch-wise, w/o token matcher", {"no_batch_wise": True, "no_token_matcher": True}),
    ("w/o batch-wise", {"no_batch_wise": True}),
    ("w/o token matcher", {"no_token_matcher": True}),
    ("full model", {}),
)


def markdown_table(results: list[tuple[str, dict]], num_semantics: int) -> str:
    lines = ["| model | pixel acc | mIoU | clusters used (of %d) |" % num_semantics,
             "| --- | ---: | ---: | ---: |"]
    for name, scores in results:
        lines.append(f"| {name} | {100 * scores['acc']:.1f} | {100 * scores['miou']:.1f} | "
                     f"{scores['clusters_used']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = build_parser()
    parser.prog = "python -m san_fast.ablation"
    args = vars(parser.parse_args(argv))
    out = Path(args.pop("out") or "runs/ablation")
    results: list[tuple[str, dict]] = []
    baseline = None
    for index, (name, switches) in enumerate(ROWS):
        flags = dict(args, **switches)
        flags["out"] = str(out / name.replace(" ", "_").replace("/", "").replace(",", ""))
        # The k-means baseline does not depend on the model: fit it once, with the full model.
        flags["no_baseline"] = index != len(ROWS) - 1
        print(f"\n=== {name} ===", file=sys.stderr)
        result = run(resolve(flags))
        results.append((name, result["san"]))
        baseline = result.get("baseline", baseline)
    cfg = resolve(dict(args))
    if baseline is not None:
        results.append(("k-means on pixels (baseline)", baseline))
    table = markdown_table(results, cfg.semantics())
    atomic_write_text(out / "ablation.md", table)
    atomic_write_json(out / "ablation.json", {name: scores for name, scores in results})
    print(table)


if __name__ == "__main__":
    main()
