"""`sts show`: pictures of what pruning does, from our torch modules on CPU (weights from the same sources as
`Pipeline.from_pretrained`).

    sts show compare --model tiny-llava --image cat.jpg --prompt "What is this?" --methods sts,divprune,cls \
        --budget 64 --png compare.png                       # what each method keeps, side by side (paper Figs. 6-7)
    sts show consistency --model tiny-llava --image cat.jpg --out report/   # KNN consistency per CLIP layer (Fig. 2)
"""
from __future__ import annotations

from pathlib import Path

import click

from sts_export.cli.options import (ANCHOR, BUDGET, CONTEXT, ENVIRONMENT, INPUT_IDS, MODEL, OUT_DIR, PROMPT,
                                    RANDOM_WEIGHTS, RECIPE, image_option)
from sts_export.errors import StsError, cli_errors
from sts_export.tokenizer import cli_input_ids


def ks_list(value: str) -> list[int]:
    """--ks '5,10,20' -> [5, 10, 20]; one line when it is not a list of integers."""
    try:
        ks = [int(k) for k in value.replace(" ", "").split(",") if k]
    except ValueError:
        raise StsError(f"--ks must be comma-separated integers, got '{value}'") from None
    if not ks:
        raise StsError("--ks is empty")
    return ks


@click.group("show", context_settings=CONTEXT, epilog=ENVIRONMENT)
def main() -> None:
    """Pictures of visual-token pruning: methods side by side, KNN consistency per CLIP layer."""


@main.command("consistency", context_settings=CONTEXT, epilog=ENVIRONMENT)
@MODEL
@RECIPE
@RANDOM_WEIGHTS
@image_option(required=True)
@OUT_DIR
@click.option("--ks", default="5,10,20", show_default=True, help="Neighbourhood sizes k, comma-separated.")
def consistency_cmd(model: str | None, recipe: str | None, random_weights: bool, image: str, out: Path | None,
                    ks: str) -> None:
    """KNN consistency of CLS attention vs. patch features at every CLIP layer (paper Fig. 2): consistency.json and
    consistency.png in --out."""
    from sts_export.show.compare import consistency  # torch: only when drawing (`sts` itself starts without it)
    from sts_export.show.diagnostics import write_report

    with cli_errors():
        if not model or out is None:
            raise StsError("pass --model and --out (the directory for consistency.json and consistency.png)")
        if out.exists() and not out.is_dir():
            raise StsError(f"--out {out} exists and is not a directory")
        result = consistency(model, image, recipe=recipe, random_weights=random_weights, ks=ks_list(ks))
        try:
            write_report(result, out / "consistency.json", out / "consistency.png",
                         title=f"KNN consistency across CLIP layers ({result['recipe']})")
        except OSError as e:
            raise StsError(f"cannot write to {out}: {e.strerror or e}") from None
        click.echo(f"wrote {out / 'consistency.json'} and {out / 'consistency.png'}", err=True)


@main.command("compare", context_settings=CONTEXT, epilog=ENVIRONMENT)
@MODEL
@RECIPE
@RANDOM_WEIGHTS
@image_option(required=True)
@PROMPT
@INPUT_IDS
@click.option("--methods", default="sts,divprune,cls,fastv", show_default=True, help="Comma-separated methods.")
@BUDGET
@ANCHOR
@click.option("--display-size", default=None, type=click.IntRange(16, 8192), help="Longest side of each panel in px.")
@click.option("--png", required=True, type=click.Path(path_type=Path), help="The picture to write (PNG).")
def compare_cmd(model: str | None, recipe: str | None, random_weights: bool, image: str, prompt: str | None,
                input_ids: str | None, methods: str, budget: str, anchor: str | None, display_size: int | None,
                png: Path) -> None:
    """Draw the tokens each method keeps at the same budget, side by side (paper Figs. 6-7)."""
    from sts_export.show.compare import compare_methods  # torch: only when drawing

    with cli_errors():
        if not model:
            raise StsError("pass --model (a recipe name, a checkpoint directory or a cached HF id)")
        ids = cli_input_ids(prompt, input_ids)
        picture = compare_methods(model, image, prompt, methods, budget, input_ids=ids, recipe=recipe,
                                  random_weights=random_weights, anchor=anchor, display_size=display_size)
        try:
            png.parent.mkdir(parents=True, exist_ok=True)
            picture.save(png, format="PNG" if png.suffix.lower() not in (".jpg", ".jpeg", ".webp") else None)
        except (OSError, ValueError) as e:
            raise StsError(f"cannot write {png}: {getattr(e, 'strerror', None) or e}") from None
        click.echo(f"wrote {png}", err=True)
