"""The paper's ablation tables on any dataset.

    python -m san_fast.ablation --out runs/ablation [--table 5|4] [--overwrite] [any train.py flag]

Table 5 (the default): the full model against each ablation switch. Table 4: the backbones, the
pixel-wise encoder ("Enc.": ResNet18, UNet, 3x3 Conv, with the ViT-6 generator) and the
semantic-wise generator ("Dec.": ResNet18, UNet, ViT-4, ViT-6, with the 3x3 Conv encoder); the
3x3 Conv + ViT-6 run is the paper's model and fills one cell of each row. Runs one training per
distinct model with the same flags and seed, each in its own folder under --out, then writes
ablation.md (a Markdown table) and ablation.json into --out and prints the table. Folders that
already hold runs are refused before anything trains, unless --overwrite (which replaces them).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from san_fast.config import ConfigError, build_parser, resolve
from san_fast.engine import run
from san_fast.io_utils import atomic_write_json, atomic_write_text
from san_fast.report import EXPECTED, print_error
from san_fast.run_folder import CHECKPOINT

PROG = "python -m san_fast.ablation"

# (row name, flags of that row): Table 5's rows, the full model last as in the paper.
ROWS = (
    ("w/o image reconstruction", {"no_reconstruction": True}),
    ("w/o batch-wise, w/o token matcher", {"no_batch_wise": True, "no_token_matcher": True}),
    ("w/o batch-wise", {"no_batch_wise": True}),
    ("w/o token matcher", {"no_token_matcher": True}),
    ("full model", {}),
)

# Table 4: one training per distinct model; the paper's model first.
TABLE4_RUNS = (
    ("3x3 Conv encoder, ViT-6 generator", {"encoder": "conv3x3", "generator": "vit", "vit_depth": 6}),
    ("ResNet18 encoder", {"encoder": "resnet18", "generator": "vit", "vit_depth": 6}),
    ("UNet encoder", {"encoder": "unet", "generator": "vit", "vit_depth": 6}),
    ("ResNet18 generator", {"encoder": "conv3x3", "generator": "resnet18"}),
    ("UNet generator", {"encoder": "conv3x3", "generator": "unet"}),
    ("ViT-4 generator", {"encoder": "conv3x3", "generator": "vit", "vit_depth": 4}),
)
TABLE4_COLUMNS = ("ResNet18", "UNet", "3x3 Conv", "ViT-4", "ViT-6")
TABLE4_CELLS = {  # (row, column) -> run; the paper leaves the other cells empty
    ("Enc.", "ResNet18"): "ResNet18 encoder",
    ("Enc.", "UNet"): "UNet encoder",
    ("Enc.", "3x3 Conv"): TABLE4_RUNS[0][0],
    ("Dec.", "ResNet18"): "ResNet18 generator",
    ("Dec.", "UNet"): "UNet generator",
    ("Dec.", "ViT-4"): "ViT-4 generator",
    ("Dec.", "ViT-6"): TABLE4_RUNS[0][0],
}


def markdown_table(results: list[tuple[str, dict]], num_semantics: int) -> str:
    lines = ["| model | pixel acc | mIoU | clusters used (of %d) |" % num_semantics,
             "| --- | ---: | ---: | ---: |"]
    for name, scores in results:
        lines.append(f"| {name} | {100 * scores['acc']:.1f} | {100 * scores['miou']:.1f} | "
                     f"{scores['clusters_used']} |")
    return "\n".join(lines) + "\n"


def table4_markdown(scores: dict[str, dict]) -> str:
    """The paper's layout: rows Enc. and Dec., cells "pixel acc / mIoU" in percent."""
    lines = ["| | " + " | ".join(TABLE4_COLUMNS) + " |", "| --- |" + " ---: |" * len(TABLE4_COLUMNS)]
    for row in ("Enc.", "Dec."):
        cells = []
        for column in TABLE4_COLUMNS:
            run_name = TABLE4_CELLS.get((row, column))
            s = scores.get(run_name) if run_name else None
            cells.append(f"{100 * s['acc']:.1f} / {100 * s['miou']:.1f}" if s else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nCells: pixel acc / mIoU (%).\n"


def row_folder(out: Path, name: str) -> Path:
    return out / name.replace(" ", "_").replace("/", "").replace(",", "")


def check_row_folders(rows, out: Path, overwrite: bool) -> None:
    """Before the first training: no row folder holds a run, unless --overwrite replaces them."""
    taken = [row_folder(out, name).name for name, _ in rows if (row_folder(out, name) / CHECKPOINT).exists()]
    if taken and not overwrite:
        raise ConfigError(f"--out {out} already holds runs of this table ({', '.join(taken)}): pass --overwrite "
                          "to train them again, or choose another --out")


def run_rows(rows, args: dict, out: Path, baseline_row: Optional[int]) -> tuple[list, Optional[dict]]:
    """One training per (name, switches) row, each in its own folder under ``out``; the k-means
    baseline (which does not depend on the model) is fitted once, with row ``baseline_row``."""
    results: list[tuple[str, dict]] = []
    baseline = None
    for index, (name, switches) in enumerate(rows):
        flags = dict(args, **switches)
        flags["out"] = str(row_folder(out, name))
        flags["no_baseline"] = index != baseline_row
        print(f"\n=== {name} ===", file=sys.stderr)
        result = run(resolve(flags))
        results.append((name, result["san"]))
        baseline = result.get("baseline", baseline)
    return results, baseline


def main(argv=None) -> int:
    parser = build_parser()
    parser.prog = PROG
    parser.add_argument("--table", type=int, choices=(4, 5), default=5,
                        help="5: the ablation switches (default); 4: encoder and generator backbones")
    args = vars(parser.parse_args(argv))
    try:
        run_table(args)
    except EXPECTED as exc:
        return print_error(PROG, exc)
    return 0


def run_table(args: dict) -> None:
    out = Path(args.pop("out") or "runs/ablation")
    table = args.pop("table")
    base = resolve(dict(args))  # every flag checked before the first training
    check_row_folders(TABLE4_RUNS if table == 4 else ROWS, out, bool(args.get("overwrite")))
    if table == 4:
        results, _ = run_rows(TABLE4_RUNS, args, out, baseline_row=None)
        text = table4_markdown(dict(results))
    else:
        results, baseline = run_rows(ROWS, args, out, baseline_row=len(ROWS) - 1)
        if baseline is not None:
            results.append(("k-means on pixels (baseline)", baseline))
        text = markdown_table(results, base.semantics())
    atomic_write_text(out / "ablation.md", text)
    atomic_write_json(out / "ablation.json", {name: scores for name, scores in results})
    print(text)


if __name__ == "__main__":
    sys.exit(main())
