"""Run an export directory: `python -m sts_export.run <export_dir> --image IMG --prompt TEXT`.

Needs only the directory: recipe, tokenizer and graphs come from it; preprocessing is PIL + numpy
(equal to the HF processor); no transformers model is loaded. ONNX Runtime by default (CUDA
provider when present); TensorRT when the directory holds engines.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from .errors import StsError, cli_errors
from .manifest import manifest_plan, manifest_recipe, read_manifest
from .tokenizer import cli_input_ids

if TYPE_CHECKING:
    from .pipeline import Pipeline

class OrtBackend:
    """Runs the ONNX graphs of an export directory with ONNX Runtime (numpy in, numpy out)."""

    name = "onnxruntime"

    def __init__(self, export_dir: Path, manifest: dict[str, Any], device: str = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.dir, self.manifest = export_dir, manifest
        avail = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in avail
        if device == "cuda" and not want_cuda:
            raise StsError("the CUDA provider of onnxruntime is not available; pip install onnxruntime-gpu or use --device cpu")
        self.providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        self.opts = ort.SessionOptions()
        if threads:
            self.opts.intra_op_num_threads = threads
        self.opts.log_severity_level = 3
        self.sessions: dict[str, Any] = {}

    def session(self, graph: str) -> Any:
        if graph not in self.sessions:
            import onnxruntime as ort

            path = self.dir / self.manifest["graphs"][graph]["onnx"]
            self.sessions[graph] = ort.InferenceSession(str(path), self.opts, providers=self.providers)
        return self.sessions[graph]

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        sess = self.session(graph)
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, {i.name: np.asarray(feeds[i.name]) for i in sess.get_inputs()})
        return dict(zip(names, outs))

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def concat(self, xs: list[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(xs, axis=axis)


def load_export_pipeline(export_dir: Path, backend: str = "auto", device: str = "auto",
                         threads: int | None = None) -> "Pipeline":
    """A Pipeline over an export directory (ONNX Runtime or TensorRT)."""
    from .pipeline import Pipeline
    from .tokenizer import TextTokenizer

    m = read_manifest(Path(export_dir))
    recipe = manifest_recipe(m)
    plan = manifest_plan(m, recipe)
    has_engines = all("engine" in g for g in m["graphs"].values())
    if backend in ("tensorrt", "trt") or (backend == "auto" and has_engines):
        if not has_engines:
            raise StsError(f"{export_dir} holds no TensorRT engines; build them with export.py --onnx-dir {export_dir} --target trt")
        from .trt_runtime import TrtBackend

        be: Any = TrtBackend(Path(export_dir))
    else:
        be = OrtBackend(Path(export_dir), m, device, threads)
    tok = TextTokenizer(Path(export_dir), recipe) if (Path(export_dir) / "tokenizer.json").is_file() else None
    return Pipeline(recipe, be, plan, tok, m["anchor"], str(export_dir))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--image", "image", required=True, help="Image file (PNG/JPEG/...).")
@click.option("--prompt", default=None, help="Question about the image (the recipe's template is applied).")
@click.option("--input-ids", default=None, help="Comma-separated token ids holding one image token (no tokenizer needed).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(0, 4096))
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--show-kept", type=click.Path(path_type=Path), default=None, help="Write a PNG of the kept patches.")
@click.option("--compare", default=None, help="With --show-kept: one panel per method (e.g. sts,divprune,cls,fastv), same budget, torch backend.")
def main(export_dir: Path, image: str, prompt: str | None, input_ids: str | None, max_new_tokens: int,
         backend: str, device: str, show_kept: Path | None, compare: str | None) -> None:
    """Answer a question about an image with an exported (pruned) model, streaming the answer."""
    with cli_errors():
        pipe = load_export_pipeline(export_dir, backend, device)
        ids = cli_input_ids(prompt, input_ids)
        pv = pipe.pixel_values(image)
        shown: list[int] = []
        printed = [""]

        def on_token(tok: np.ndarray) -> None:
            shown.append(int(tok[0]))
            text = pipe.decode(shown)
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

        gen = pipe.generate(pv, prompt, input_ids=ids, max_new_tokens=max_new_tokens, on_token=on_token)
        sys.stdout.write("\n")
        kp = "" if gen.keep_post is None else f", Stage 2 kept {gen.keep_post.shape[1]}"
        click.echo(f"[{pipe.backend.name}] Stage 1 kept {gen.keep_pre.shape[1]}/{pipe.recipe.num_image_tokens}{kp}; "
                   f"TTFT {gen.timings['ttft'] * 1000:.1f} ms, decode {gen.timings['decode'] * 1000:.1f} ms/token", err=True)
        if compare and show_kept is None:
            raise StsError("--compare writes a picture: pass --show-kept OUT.png too")
        if compare:
            from .show import compare_methods

            m = read_manifest(export_dir, verify=False)
            src = m["model"]
            model = m["recipe"]["name"] if src["synthetic"] or src["random_weights"] else src["source"]
            img = compare_methods(model, image, prompt or "", [x for x in compare.split(",") if x], m["budget"],
                                  input_ids=ids, random_weights=src["random_weights"])
            img.save(show_kept)
            click.echo(f"wrote {show_kept}", err=True)
        elif show_kept is not None:
            from .visualize import draw_kept
            from .preprocess import load_image

            img = draw_kept(load_image(image), gen.keep_pre[0], None if gen.keep_post is None else gen.keep_post[0],
                            pipe.recipe.image_processor, title=f"{pipe.plan.method} b={pipe.plan.budget}")
            img.save(show_kept)
            click.echo(f"wrote {show_kept}", err=True)


if __name__ == "__main__":
    main()
