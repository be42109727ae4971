"""`sts run EXPORT_DIR --image IMG --prompt TEXT` (also `python -m sts_export.run`): answer a question about an
image with an export, streaming the answer, and say what was kept and how long it took.

Needs only the directory: recipe, tokenizer and graphs come from it; preprocessing is PIL + numpy (equal to the HF
processor); no transformers model is loaded. ONNX Runtime by default (CUDA provider when present); TensorRT when
the directory holds engines; AOTInductor packages with --backend aoti.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from sts_export.artifact.manifest import read_manifest
from sts_export.cli.options import CONTEXT, ENVIRONMENT, input_options, runtime_options
from sts_export.errors import StsError, cli_errors
from sts_export.pipeline import load_export_pipeline
from sts_export.tokenizer import cli_input_ids


@click.command("run", context_settings=CONTEXT, epilog=ENVIRONMENT)
@click.argument("export_dir", type=click.Path(path_type=Path))
@input_options(image_required=True)
@runtime_options
@click.option("--show-kept", type=click.Path(path_type=Path), default=None, help="Write a PNG of the kept patches.")
@click.option("--compare", default=None,
              help="With --show-kept: one panel per method (e.g. sts,divprune,cls,fastv), same budget, torch backend.")
def main(export_dir: Path, image: str, prompt: str | None, input_ids: str | None, max_new_tokens: int,
         backend: str, device: str, threads: int | None, show_kept: Path | None, compare: str | None) -> None:
    """Answer a question about an image with an exported (pruned) model, streaming the answer."""
    with cli_errors():
        pipe = load_export_pipeline(export_dir, backend, device, threads)
        ids = cli_input_ids(prompt, input_ids, raw_fallback=True)  # neither: the Pipeline's raw prompt (no tokenizer)
        inp = pipe.prepare_image(image)  # the family's preprocessing (= its transformers processor)
        shown: list[int] = []
        printed = [""]

        def on_token(tok: np.ndarray) -> None:
            shown.append(int(tok[0]))
            text = pipe.decode(shown)
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

        gen = pipe.generate(inp, prompt, input_ids=ids, max_new_tokens=max_new_tokens, on_token=on_token)
        sys.stdout.write("\n")
        kp = "" if gen.keep_post is None else f", Stage 2 kept {gen.keep_post.shape[1]}"
        total = inp.n_full if gen.keep_pre.shape[1] == inp.n_full else inp.n  # the whole span when Stage 1 kept it
        click.echo(f"[{pipe.backend.name}] Stage 1 kept {gen.keep_pre.shape[1]}/{total}{kp}; "
                   f"TTFT {gen.timings['ttft'] * 1000:.1f} ms, decode {gen.timings['decode'] * 1000:.1f} ms/token", err=True)
        if compare and show_kept is None:
            raise StsError("--compare writes a picture: pass --show-kept OUT.png too")
        if compare:
            if pipe.recipe.dynamic_tokens:
                raise StsError(f"--compare draws LLaVA-1.5 models only, not {pipe.recipe.family}; use --show-kept alone")
            from sts_export.show.compare import compare_methods

            m = read_manifest(export_dir, verify=False)
            src = m["model"]
            model = m["recipe"]["name"] if src["synthetic"] or src["random_weights"] else src["source"]
            img = compare_methods(model, image, prompt or "", [x for x in compare.split(",") if x], m["budget"],
                                  input_ids=ids, random_weights=src["random_weights"])
            img.save(show_kept)
            click.echo(f"wrote {show_kept}", err=True)
        elif show_kept is not None:
            from sts_export.show.pictures import draw_kept, draw_kept_boxes, draw_next_kept
            from sts_export.families.llava import load_image

            picture = load_image(image)
            post = None if gen.keep_post is None else gen.keep_post[0]
            title = f"{pipe.plan.method} b={pipe.plan.budget}"
            if "packed_index" in inp.feeds:  # LLaVA-NeXT: base-crop and tile panels from the candidates' boxes
                img = draw_next_kept(picture, inp, gen.keep_pre[0], post, title=title)
            elif inp.boxes is not None:  # one box per candidate, keep_pre indexes them (Qwen2.5-VL: 28-px cells)
                img = draw_kept_boxes(picture, inp.boxes, gen.keep_pre[0], post, title=title)
            else:
                img = draw_kept(picture, gen.keep_pre[0], post, pipe.recipe.image_processor, title=title)
            img.save(show_kept)
            click.echo(f"wrote {show_kept}", err=True)


