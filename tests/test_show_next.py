"""LLaVA-NeXT kept-token pictures: candidate-space statuses from a Generation's keep_pre/keep_post
(Stage 1 pruned, and the packed span without Stage 1), the base-crop + tile panels and their pixels,
and run.py's --show-kept branch for NeXT."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sts_export import Pipeline, load_recipe
from sts_export.families import ImageInput
from sts_export.families import llava_next
from sts_export.show import pictures as vis
from sts_export.show.pictures import (draw_kept_boxes, draw_next_kept, next_candidate_keep, next_groups,
                                      next_token_status)
from tests.conftest import make_image

NAME = "tiny-llava-next"
RECIPE = load_recipe(NAME)
G2 = RECIPE.vision.num_patches  # 576 base-crop tokens
GAP = 8
BASE = (200, 100, 50)  # a flat image colour: every styled pixel has a known value
# (width, height) -> (rows, cols) of the anyres tile grid
GRIDS = {(640, 480): (2, 2), (350, 700): (2, 1), (900, 280): (1, 3)}


def prepared(w: int, h: int, colour: tuple[int, int, int] | None = None) -> tuple[Image.Image, ImageInput]:
    img = Image.new("RGB", (w, h), colour) if colour else make_image(w, h, seed=w + h)
    return img, llava_next.prepare_image(img, RECIPE)


def _mix(base: tuple[int, ...], colour: tuple[int, ...], a: float) -> np.ndarray:
    return (1 - a) * np.array(base, float) + a * np.array(colour, float)


def candidate_of_position(inp: ImageInput) -> dict[int, int]:
    """Packed span position -> candidate index (newline positions absent), by a plain dict lookup."""
    where = {int(t): j for j, t in enumerate(inp.feeds["token_index"])}
    return {p: where[int(t)] for p, t in enumerate(inp.feeds["packed_index"]) if int(t) in where}


def isolated(inp: ImageInput, w_tokens: int, rows: range, step: int = 3) -> np.ndarray:
    """Candidates on every `step`-th row and column of a raster group (no two of them touch)."""
    r, c = np.divmod(np.arange(len(rows)), w_tokens)
    return np.asarray(rows)[(r % step == 1) & (c % step == 1)]


# ---------------------------------------------------------------- statuses in candidate space

def test_layout_invariants() -> None:
    for (w, h), (rows, cols) in GRIDS.items():
        _, inp = prepared(w, h)
        assert inp.n_full > inp.n  # one newline per stitched row: K <= N tells the two cases apart
        base, tiles = next_groups(inp)
        assert base[0] == "base crop (24x24)" and list(base[1]) == list(range(G2))
        assert tiles[0].startswith(f"tiles {rows}x{cols} (") and list(tiles[1]) == list(range(G2, inp.n))
        assert len(inp.boxes) == inp.n


def test_status_when_stage1_prunes() -> None:
    _, inp = prepared(640, 480)
    rng = np.random.default_rng(0)
    keep_pre = np.sort(rng.choice(inp.n, 300, replace=False))  # [K] candidate indices
    keep_post = np.sort(rng.choice(300, 100, replace=False))  # [K'] indices into keep_pre
    ck = next_candidate_keep(inp, keep_pre[None], keep_post[None])  # [1, K] rows, as a Generation holds them
    np.testing.assert_array_equal(ck.keep_pre, keep_pre)
    np.testing.assert_array_equal(ck.keep_post, keep_post)
    assert (ck.newlines, ck.newlines_kept) == (0, 0)
    status = next_token_status(inp, keep_pre, keep_post)
    expected = np.zeros(inp.n, np.int8)
    expected[keep_pre] = 1
    expected[keep_pre[keep_post]] = 2
    np.testing.assert_array_equal(status, expected)
    assert next_token_status(inp, keep_pre, None).tolist() == np.minimum(expected, 1).tolist()


def test_status_without_stage1_maps_the_packed_span() -> None:
    _, inp = prepared(900, 280)  # 1x3 tiles, unpadded: newline positions inside the span
    pos2cand = candidate_of_position(inp)
    newline_pos = [p for p in range(inp.n_full) if p not in pos2cand]
    assert len(newline_pos) == inp.n_full - inp.n
    keep_pre = np.arange(inp.n_full)  # fastv / none: the whole packed span
    rng = np.random.default_rng(1)
    keep_post = np.sort(np.concatenate([rng.choice(list(pos2cand), 400, replace=False), newline_pos[:3]]))

    ck = next_candidate_keep(inp, keep_pre, keep_post)  # fastv
    assert ck.keep_pre is None  # Stage 1 kept every candidate
    assert (ck.newlines, ck.newlines_kept) == (len(newline_pos), 3)
    status = next_token_status(inp, keep_pre, keep_post)
    expected = np.ones(inp.n, np.int8)
    expected[[pos2cand[p] for p in keep_post if p in pos2cand]] = 2
    np.testing.assert_array_equal(status, expected)
    assert (status == 2).sum() == 400
    # the candidates it names are the ones at those span positions, in candidate order
    assert sorted(ck.keep_post.tolist()) == sorted(pos2cand[p] for p in keep_post if p in pos2cand)

    none = next_candidate_keep(inp, keep_pre[None], None)  # none / full: everything, no Stage 2
    assert none.keep_pre is None and none.keep_post is None and none.newlines_kept == none.newlines
    assert (next_token_status(inp, keep_pre, None) == 1).all()


def test_status_rejects_bad_indices() -> None:
    _, inp = prepared(350, 700)
    with pytest.raises(ValueError, match="keep_pre"):
        next_candidate_keep(inp, [0, 0, 1], None)
    with pytest.raises(ValueError, match="keep_post"):
        next_candidate_keep(inp, [0, 1, 2], [3])
    with pytest.raises(ValueError, match="keep_post"):
        next_candidate_keep(inp, np.arange(inp.n_full), [inp.n_full])


# ---------------------------------------------------------------- the picture

def test_panels_size_and_layout() -> None:
    w, h = 640, 480
    img, inp = prepared(w, h, BASE)
    pic = draw_kept_boxes(img, inp.boxes, None, None, groups=next_groups(inp), title="none")
    assert pic.mode == "RGB" and pic.width == 2 * w + 3 * GAP and pic.height > h
    arr = np.asarray(pic)
    body = arr[pic.height - h:]  # [H, 2W + 3 gap, 3] panels, bottoms aligned
    for x in (0, GAP - 1, GAP + w, 2 * GAP + w - 1, 2 * GAP + 2 * w, pic.width - 1):
        assert (body[:, x] == 255).all()  # white margins and the gap between panels
    # no pruning, no Stage 2: both panels are the untouched image
    assert (body[:, GAP:GAP + w] == BASE).all() and (body[:, 2 * GAP + w:2 * GAP + 2 * w] == BASE).all()
    assert (arr[:pic.height - h] == 255).mean() > 0.5  # header and captions mostly white

    one = draw_kept_boxes(img, inp.boxes, None, None, groups=next_groups(inp)[:1], display_size=320)
    assert one.width == 320 + 2 * GAP  # one panel, longest side scaled to display_size
    with pytest.raises(ValueError, match="group"):
        draw_kept_boxes(img, inp.boxes, None, None, groups=[("bad", [inp.n])])


@pytest.mark.parametrize("stage2", [False, True])
def test_pixels_of_base_and_tile_tokens(stage2: bool) -> None:
    w, h = 640, 480
    img, inp = prepared(w, h, BASE)
    (_, base_idx), (tile_name, tile_idx) = next_groups(inp)
    uw = int(tile_name.split("(")[1].split("x")[1].split()[0])  # stitched grid width in tokens
    keep_pre = np.concatenate([isolated(inp, 24, base_idx), isolated(inp, uw, tile_idx)])  # [K] ascending
    keep_post = np.arange(0, len(keep_pre), 2) if stage2 else None
    status = vis.token_status(inp.n, keep_pre, keep_post)
    pic = draw_kept_boxes(img, inp.boxes, keep_pre, keep_post, groups=next_groups(inp))
    body = np.asarray(pic, float)[pic.height - h:]
    panels = {"base": body[:, GAP:GAP + w], "tiles": body[:, 2 * GAP + w:2 * GAP + 2 * w]}
    expected = {0: _mix(BASE, vis.PRUNED_GREY, vis.PRUNED_MIX),
                1: _mix(BASE, vis.PRUNED_GREY, vis.DROPPED_MIX) if stage2 else np.array(BASE, float),
                2: _mix(BASE, vis.STAGE2_COLOR, vis.STAGE2_MIX)}
    outline = {1: vis.STAGE1_COLOR, 2: vis.STAGE2_COLOR}
    seen = set()
    for group, idx in (("base", base_idx), ("tiles", tile_idx)):
        for i in idx:
            x0, y0, x1, y1 = inp.boxes[i]
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            np.testing.assert_allclose(panels[group][cy, cx], expected[status[i]], atol=1, err_msg=f"{group} {i}")
            if status[i]:
                np.testing.assert_array_equal(panels[group][cy, int(round(x0))], outline[status[i]])
            seen.add((group, int(status[i])))
    want = {(g, s) for g in ("base", "tiles") for s in ((0, 1, 2) if stage2 else (0, 1))}
    assert want <= seen  # pruned and kept tokens checked in both panels
    if not stage2:  # a kept token's inside is the original image, untouched
        i, j = keep_pre[0], keep_pre[-1]  # one base token, one tile token
        for group, k in (("base", i), ("tiles", j)):
            x0, y0, x1, y1 = np.round(inp.boxes[k]).astype(int)
            assert (panels[group][y0 + 2:y1 - 2, x0 + 2:x1 - 2] == BASE).all()


def test_pixels_on_a_real_picture_match_the_original() -> None:
    img, inp = prepared(640, 480)  # textured: the untouched inside of a kept token equals the source pixels
    keep_pre = np.array([G2 + 5 * 48 + 7, 3 * 24 + 4])  # one tile token, one base token
    keep_pre.sort()
    pic = draw_kept_boxes(img, inp.boxes, keep_pre, None, groups=next_groups(inp))
    body = np.asarray(pic)[pic.height - 480:]
    src = np.asarray(img)
    for k, x_off in ((3 * 24 + 4, GAP), (G2 + 5 * 48 + 7, 2 * GAP + 640)):
        x0, y0, x1, y1 = np.round(inp.boxes[k]).astype(int)
        np.testing.assert_array_equal(body[y0 + 2:y1 - 2, x_off + x0 + 2:x_off + x1 - 2], src[y0 + 2:y1 - 2, x0 + 2:x1 - 2])
        # a pruned neighbour two tokens to the right is greyed
        nx = x1 + (x1 - x0) + 3
        grey = _mix(tuple(src[y0 + 3, nx]), vis.PRUNED_GREY, vis.PRUNED_MIX)
        np.testing.assert_allclose(body[y0 + 3, x_off + nx], grey, atol=1)


@pytest.fixture(scope="module")
def sts_pipe() -> Pipeline:
    return Pipeline.from_pretrained(NAME, budget=320, method="sts")


@pytest.mark.parametrize("size", [(350, 700), (900, 280)])  # 2x1 and 1x3 tile grids
def test_renders_generation_for_grid(sts_pipe: Pipeline, size: tuple[int, int]) -> None:
    w, h = size
    img = make_image(w, h, seed=4)
    inp = sts_pipe.prepare_image(img)
    rows, cols = GRIDS[size]
    assert inp.feeds["pixel_values"].shape[0] == 1 + rows * cols
    gen = sts_pipe.generate(inp, "hi", max_new_tokens=1)
    pic = draw_next_kept(img, inp, gen.keep_pre[0], gen.keep_post[0], title="sts b=320")
    assert pic.width == 2 * w + 3 * GAP and pic.height > h
    status = next_token_status(inp, gen.keep_pre, gen.keep_post)
    assert (status >= 1).sum() == gen.keep_pre.shape[1] and (status == 2).sum() == gen.keep_post.shape[1]
    assert (status[:G2] >= 1).any() and (status[G2:] >= 1).any()  # picks in the base crop and in the tiles
    # both panels carry colour marks: red Stage-2 pixels exist in each
    body = np.asarray(pic, int)[pic.height - h:]
    for x_off in (GAP, 2 * GAP + w):
        p = body[:, x_off:x_off + w]
        assert ((p == vis.STAGE2_COLOR).all(-1)).any() and ((p == vis.STAGE1_COLOR).all(-1)).any()


def test_fastv_generation_maps_through_packed_index() -> None:
    pipe = Pipeline.from_pretrained(NAME, budget=2000, method="fastv")
    img = make_image(350, 700, seed=5)
    inp = pipe.prepare_image(img)
    gen = pipe.generate(inp, "hi", max_new_tokens=1)
    assert gen.keep_pre.shape[1] == inp.n_full  # arange over the packed span, newlines included
    ck = next_candidate_keep(inp, gen.keep_pre, gen.keep_post)
    pos2cand = candidate_of_position(inp)
    post = gen.keep_pre[0][gen.keep_post[0]]
    assert sorted(ck.keep_post.tolist()) == sorted(pos2cand[int(p)] for p in post if int(p) in pos2cand)
    assert ck.newlines == inp.n_full - inp.n
    assert len(ck.keep_post) + ck.newlines_kept == gen.keep_post.shape[1]
    pic = draw_next_kept(img, inp, gen.keep_pre[0], gen.keep_post[0], title="fastv")
    assert pic.width == 2 * 350 + 3 * GAP


# ---------------------------------------------------------------- run.py --show-kept

def test_run_show_kept_draws_next_panels(sts_pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sts_export.cli.run as run

    img_path, out = tmp_path / "img.png", tmp_path / "kept.png"
    make_image(350, 700, seed=6).save(img_path)
    gens = []

    class Pipe:  # the torch pipeline in place of an export directory's
        recipe, plan, backend, decode = sts_pipe.recipe, sts_pipe.plan, sts_pipe.backend, sts_pipe.decode
        prepare_image = staticmethod(sts_pipe.prepare_image)
        pixel_values = staticmethod(sts_pipe.prepare_image)  # NeXT generates from its ImageInput, never bare pixels

        @staticmethod
        def generate(*a, **k):
            gens.append(sts_pipe.generate(*a, **k))
            return gens[-1]

    monkeypatch.setattr(run, "load_export_pipeline", lambda *a: Pipe())
    r = CliRunner().invoke(run.main, [str(tmp_path), "--image", str(img_path), "--prompt", "hi",
                                      "--max-new-tokens", "1", "--show-kept", str(out)])
    assert r.exit_code == 0, r.output
    img = Image.open(img_path)
    ref = draw_next_kept(img, sts_pipe.prepare_image(img), gens[0].keep_pre[0], gens[0].keep_post[0],
                         title=f"sts b={sts_pipe.plan.budget}")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref))

    r = CliRunner().invoke(run.main, [str(tmp_path), "--image", str(img_path), "--prompt", "hi",
                                      "--max-new-tokens", "1", "--show-kept", str(out), "--compare", "sts,cls"])
    assert r.exit_code == 2 and "error: --compare draws LLaVA-1.5 models only" in r.output
