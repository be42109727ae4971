import dataclasses

import pytest

from sts_export import StsError, load_recipe, split_budget
from sts_export.pruning.budget import valid_budget_range
from sts_export.recipe import RECIPE_DIR, available_recipes


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_loads(name: str) -> None:
    r = load_recipe(name)
    assert r.name == name
    # LLaVA-1.5: one 336-px crop of 24x24 patches; LLaVA-NeXT: base crop + at most 4 tiles of them (2880);
    # Qwen2.5-VL / Qwen3-VL: one LLM token per 28x28 / 32x32 px of the largest image smart_resize allows
    expected = {"llava-1.5": 576, "llava-next": 2880, "qwen2.5-vl": r.image_processor.max_pixels // (28 * 28),
                "qwen3-vl": r.image_processor.max_pixels // (32 * 32)}
    assert r.num_image_tokens == expected[r.family] and r.num_image_tokens > 0
    assert dataclasses.is_dataclass(r)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "x"  # type: ignore[misc]
    assert load_recipe(RECIPE_DIR / f"{name}.yaml") == r


def test_ratio_and_per_image_budgets() -> None:
    from sts_export.pruning.budget import parse_budget

    nxt = load_recipe("llava-next-7b")
    assert [tuple(split_budget(b, nxt)) for b in (640, 320, 160)] == [(960, 320), (480, 160), (240, 80)]  # paper
    assert tuple(split_budget(320, nxt, n=2304)) == (480, 160)  # K(b) fits this image's N
    assert tuple(split_budget(320, nxt, n=400)) == (400, 133)  # capped at N, K' = min(round(rho*K(b)), K)
    assert tuple(split_budget(320, nxt, "sts-s", n=300)) == (300, 300)
    # a ratio is r * N of the image, unrounded, then each method's own rule
    assert tuple(split_budget("10%", nxt, "sts-s", n=2304)) == (230, 230)
    assert tuple(split_budget("10%", nxt, "sts", n=2304)) == (346, 115)  # b = 230.4 -> K = round(230.4*32/(16+16/3))
    assert parse_budget("20%") == "20%" and parse_budget(" 12.5% ") == "12.5%"
    for bad in ("0%", "101%", "x%", "-3"):
        with pytest.raises(StsError):
            parse_budget(bad)


def test_recipe_files_present() -> None:
    assert {"llava-1.5-7b", "llava-1.5-13b", "tiny-llava", "tiny-llava-gqa"} <= set(available_recipes())
    r7, r13 = load_recipe("llava-1.5-7b"), load_recipe("llava-1.5-13b")
    assert (r7.text.num_layers, r7.text.hidden_size, r7.vision.hidden_size) == (32, 4096, 1024)
    assert (r13.text.num_layers, r13.text.hidden_size, r13.text.num_heads) == (40, 5120, 40)
    assert r7.source == "llava-hf/llava-1.5-7b-hf" and r13.source == "llava-hf/llava-1.5-13b-hf"
    assert r7.pruning.prune_layer == 16 and abs(r7.pruning.post_ratio - 1 / 3) < 1e-12
    assert r7.vision.feature_layer == -2 and r7.image_token_id == 32000
    assert load_recipe("tiny-llava").synthetic and not r7.synthetic


def test_unknown_key_rejected(tmp_path) -> None:
    text = (RECIPE_DIR / "tiny-llava.yaml").read_text().replace("seed: 1234", "seed: 1234\nsede: 3")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(StsError, match="unknown key.*sede"):
        load_recipe(tmp_path / "bad.yaml")
    nested = (RECIPE_DIR / "tiny-llava.yaml").read_text().replace("anchor: mean", "anchor: mean, anchr: x")
    (tmp_path / "bad2.yaml").write_text(nested)
    with pytest.raises(StsError, match="pruning.*anchr"):
        load_recipe(tmp_path / "bad2.yaml")


def test_unknown_recipe() -> None:
    with pytest.raises(StsError, match="unknown recipe 'llava-9b'.*available"):
        load_recipe("llava-9b")


def test_paper_budgets() -> None:
    r = load_recipe("llava-1.5-7b")
    assert split_budget(128, r) == (192, 64)
    assert split_budget(64, r) == (96, 32)
    assert split_budget(32, r) == (48, 16)
    assert split_budget("full", r) == (576, 576)
    assert split_budget(64, r, "sts-s") == (64, 64)
    assert split_budget(64, r, "divprune") == (64, 64)
    assert split_budget(64, r, "none") == (576, 576)
    k_pre, k_post = split_budget(64, r, "fastv")  # average over layers stays 64: (2*576 + 30*K')/32
    assert k_pre == 576 and k_post == round((64 * 32 - 2 * 576) / 30)


@pytest.mark.parametrize("method", ["sts", "sts-s", "fastv", "cls"])
def test_budget_average_matches_definition(method: str) -> None:
    """The split's per-layer average equals the budget (up to rounding) for every valid budget."""
    from sts_export.pruning.budget import prune_layer_for

    r = load_recipe("llava-1.5-7b")
    lo, hi = valid_budget_range(r, method)
    pl = prune_layer_for(method, r)
    for b in range(lo, hi + 1, 7):
        k, kp = split_budget(b, r, method)
        avg = (pl * k + (32 - pl) * kp) / 32 if method in ("sts", "fastv") else k
        assert abs(avg - b) <= 1.0, (b, k, kp)


def test_out_of_range_budget_names_range() -> None:
    r = load_recipe("llava-1.5-7b")
    with pytest.raises(StsError, match=r"valid budgets are 1\.\.384"):
        split_budget(400, r)
    with pytest.raises(StsError, match=r"valid budgets are 37\.\.576"):
        split_budget(20, r, "fastv")
    with pytest.raises(StsError, match="positive integer"):
        split_budget(0, r)
    with pytest.raises(StsError, match="positive integer"):
        split_budget("lots", r)
    with pytest.raises(StsError, match="unknown method 'foo'"):
        split_budget(64, r, "foo")


def test_model_may_be_a_recipe_file(tmp_path) -> None:
    """--model takes a recipe YAML file as it takes a recipe name: a user's variant of a shipped architecture."""
    from sts_export.checkpoint import resolve

    text = (RECIPE_DIR / "tiny-llava.yaml").read_text()
    assert "name: tiny-llava\n" in text and "num_heads: 4" in text
    (tmp_path / "variant.yaml").write_text(text.replace("name: tiny-llava\n", "name: tiny-llava-variant\n")
                                           .replace("num_heads: 4", "num_heads: 2", 1))
    src = resolve(str(tmp_path / "variant.yaml"), random_weights=True)
    assert src.recipe.name == "tiny-llava-variant" and src.path is None
    assert (src.recipe.vision.num_heads, load_recipe("tiny-llava").vision.num_heads) == (2, 4)
    (tmp_path / "bad.yaml").write_text(text.replace("seed: 1234", "seed: 1234\nsede: 3"))
    with pytest.raises(StsError, match="unknown key.*sede"):
        resolve(str(tmp_path / "bad.yaml"), random_weights=True)
    with pytest.raises(StsError, match="not a recipe .* or recipe YAML file"):
        resolve(str(tmp_path / "missing.yaml"), random_weights=True)
