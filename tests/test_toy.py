"""The toy CNSD (issue #18): data, metrics, the VAE encoder, the checkpoint layout, one step of each stage,
and the train-toy command end to end on a CPU in seconds."""
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib.cnsd import build_cnsd, get_config
from course_lib.cnsd.checkpoint import load_checkpoint, read_state_dict
from course_lib.cnsd.config import LATENT_SCALE
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.pipeline.hint import canny_hint
from course_lib.toy.data import COLOUR_NAMES, COLOURS, SHAPE_NAMES, Scenes, ShapesData, describe, hints, render, sample_scenes
from course_lib.toy.evaluate import evaluate_pipeline, evaluation_table
from course_lib.toy.metrics import edge_f1, read_colour, regions
from course_lib.toy.train import (RECIPES, SUFFIXES, UNCOND, TextTable, calibrate_latents, init_controlnet,
                                  train_controlnet, train_unet, train_vae)
from course_lib.toy.vae_encoder import VAEEncoder
from course_lib.toy.weights import load_toy, save_safetensors, toy_checkpoint_state, toy_tokenizer, weights_status

pytestmark = pytest.mark.usefixtures("one_thread")
LAYOUT = Path(__file__).parent / "data" / "control_sd15_canny_layout.json"


def real_layout() -> dict[str, tuple[list[int], str]]:
    return {name: (shape, dtype) for name, shape, dtype in json.loads(LAYOUT.read_text())["tensors"]}


# ------------------------------------------------------------------------------------------------ data

def test_scenes_are_deterministic_and_seeded():
    a, b, c = sample_scenes(32, seed=3), sample_scenes(32, seed=3), sample_scenes(32, seed=4)
    for f in Scenes.__dataclass_fields__:
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.cx, c.cx)
    assert torch.equal(render(a)[0], render(b)[0])
    assert bool((a.colour != a.background).all())                       # never the same colour twice


def test_prompts_name_the_colours_drawn():
    scenes = sample_scenes(40, seed=5)
    images, cover = render(scenes)
    for i in range(len(scenes)):
        colour, background = COLOUR_NAMES[int(scenes.colour[i])], COLOUR_NAMES[int(scenes.background[i])]
        assert scenes.prompt(i).split()[1:3] == [colour, SHAPE_NAMES[int(scenes.shape[i])]]
        assert scenes.prompt(i).endswith(f"{background} background")
        inside, outside = cover[i] == 1, cover[i] == 0
        assert inside.any() and outside.any()
        assert (images[i][inside] == torch.tensor(COLOURS[colour], dtype=torch.uint8)).all()
        assert (images[i][outside] == torch.tensor(COLOURS[background], dtype=torch.uint8)).all()
    assert describe(0, 1, 0) == "an orange circle on a red background"


def test_every_colour_pair_gives_canny_edges_on_the_outline():
    n = len(COLOUR_NAMES)
    pairs = [(c, b) for c in range(n) for b in range(n) if c != b]
    scenes = Scenes(torch.zeros(len(pairs), dtype=torch.long), torch.tensor([c for c, _ in pairs]),
                    torch.tensor([b for _, b in pairs]), torch.full((len(pairs),), 32.0),
                    torch.full((len(pairs),), 32.0), torch.full((len(pairs),), 20.0), torch.zeros(len(pairs)))
    images, cover = render(scenes)
    edges = hints(images)
    rim = (cover > 0) & (cover < 1)                                        # the anti-aliased outline
    for k, (c, b) in enumerate(pairs):
        p, r, f = edge_f1(edges[k], rim[k].numpy(), tolerance=1)
        assert f > 0.9, (COLOUR_NAMES[c], COLOUR_NAMES[b], p, r)


def test_pool_hints_are_the_pipelines_canny():
    data = ShapesData(6, seed=2)
    data.make_hints()
    for i in range(6):
        edge_map, hint = canny_hint(data.images[i].permute(1, 2, 0).numpy())
        assert torch.equal(data.hint(torch.tensor([i]))[0], hint[0])
    assert data.pixels(torch.arange(6)).min() >= -1 and data.pixels(torch.arange(6)).max() <= 1


# --------------------------------------------------------------------------------------------- metrics

def test_edge_f1_on_known_cases():
    a = np.zeros((64, 64), np.uint8)
    a[20, 10:50] = 255
    assert edge_f1(a, a) == (1.0, 1.0, 1.0)
    assert edge_f1(np.roll(a, 2, axis=0), a, tolerance=2)[2] == 1.0      # 2 px off: within tolerance
    assert edge_f1(np.roll(a, 5, axis=0), a, tolerance=2)[2] == 0.0      # 5 px off: no match
    half = a.copy()
    half[20, 30:50] = 0
    p, r, f = edge_f1(half, a, tolerance=0)
    assert (p, r) == (1.0, 0.5) and f == pytest.approx(2 / 3)
    assert edge_f1(np.zeros_like(a), np.zeros_like(a)) == (1.0, 1.0, 1.0)
    assert edge_f1(np.zeros_like(a), a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="expected two"):
        edge_f1(a, a[:32])


def test_colours_read_back_from_known_images():
    scenes = sample_scenes(24, seed=7)
    images, cover = render(scenes)
    rng = np.random.default_rng(0)
    for i in range(len(scenes)):
        noisy = np.clip(images[i].numpy().astype(int) + rng.integers(-25, 26, images[i].shape), 0, 255).astype(np.uint8)
        inside, outside = regions(cover[i].numpy())
        assert inside.sum() > 50 and outside.sum() > 50
        assert read_colour(noisy, inside) == COLOUR_NAMES[int(scenes.colour[i])]
        assert read_colour(noisy, outside) == COLOUR_NAMES[int(scenes.background[i])]
    assert read_colour(images[0].numpy(), np.zeros((64, 64), bool)) is None


class EchoPipeline:
    """A 'pipeline' that returns its input: it follows every hint and every colour perfectly."""
    progress = False

    def process(self, image, prompt, **kwargs):
        self.last_edge_map = canny_hint(image)[0]
        return [image.copy()]


def test_evaluation_of_a_perfect_and_a_blank_pipeline():
    perfect = evaluate_pipeline(EchoPipeline(), "echo", n=6)
    assert (perfect.n, perfect.edge_f1, perfect.colour_accuracy) == (6, 1.0, 1.0) and perfect.meets_targets()
    blank = EchoPipeline()
    blank.process = lambda image, prompt, **kw: (setattr(blank, "last_edge_map", canny_hint(image)[0]),
                                                 [np.full_like(image, 128)])[1]
    score = evaluate_pipeline(blank, "blank", n=6)
    assert score.edge_f1 == 0.0 and not score.meets_targets()
    assert "| echo | 1.000 |" in evaluation_table([perfect, score])


# -------------------------------------------------------------------------------- model and checkpoint

def test_vae_encoder_matches_the_real_checkpoint_layout():
    with torch.device("meta"):
        encoder = VAEEncoder(get_config("sd15").vae)
    layout = real_layout()
    ours = {("first_stage_model." + k): list(t.shape) for k, t in encoder.state_dict().items()}
    theirs = {k: s for k, (s, _) in layout.items() if k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv."))}
    assert ours == theirs and len(ours) == 108


def test_toy_tokenizer_is_compact():
    ids = toy_tokenizer()(["a red circle on a blue background"])
    assert ids[0, 0] == 512 and ids.max() == 513 and int(ids[0, 1:-1].max()) < 514
    assert byte_level_tokenizer()([""])[0, 0] == 49406                  # the tiny preset's ids are unchanged
    assert get_config("toy").clip.vocab_size == 514


def toy_parts(seed=1):
    torch.manual_seed(seed)
    return build_cnsd(get_config("toy"), seed=seed), VAEEncoder(get_config("toy").vae)


def test_toy_checkpoint_has_the_real_files_keys_and_loads_back(tmp_path):
    model, encoder = toy_parts()
    state = toy_checkpoint_state(model, encoder)
    layout = real_layout()
    # the real file's names; only CLIP is shallower (3 layers of 12), as in the tiny preset (2)
    assert set(state) <= set(layout)
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in set(layout) - set(state)}
    assert layers == set(range(3, 12)) and all(".text_model.encoder.layers." in k for k in set(layout) - set(state))
    assert all(str(t.dtype).replace("torch.", "") == layout[k][1] for k, t in state.items())
    path = save_safetensors(state, tmp_path / "toy.safetensors", {"format": "pt"})
    assert path.stat().st_size < 10.5e6                                  # ~10 MB, fp32
    fresh = build_cnsd(get_config("toy"), seed=None)
    report = load_checkpoint(path, fresh)
    assert report.loaded == {"unet": 686, "controlnet": 340, "vae_decoder": 140, "clip": 196 - 9 * 16}
    assert sum(report.unused.values()) == 108 + 1 + 13
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    again = load_toy(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_fallback_safetensors_writer_is_readable_by_safetensors(tmp_path, monkeypatch):
    from safetensors import safe_open

    state = {"b": torch.randn(3, 5), "a": torch.arange(7)[None], "c": torch.randn(2).half()}
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)          # as on a machine without the package
    save_safetensors(state, tmp_path / "x.safetensors", {"format": "pt"})
    monkeypatch.undo()
    back = read_state_dict(tmp_path / "x.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_missing_weights_say_so_in_one_line(tmp_path):
    missing = tmp_path / "cnsd_toy.safetensors"
    assert weights_status(missing).startswith("toy weights not there yet") and "\n" not in weights_status(missing)
    with pytest.raises(FileNotFoundError, match="not there yet"):
        load_toy(missing)


# ------------------------------------------------------------------------------------- training stages

def test_one_step_of_each_stage(tmp_path):
    recipe = dataclasses.replace(RECIPES["smoke"], vae_steps=1, unet_steps=1, control_steps=1, batch=3)
    data = ShapesData(8, seed=1)
    model = build_cnsd(get_config("toy"), seed=None).train()
    encoder = VAEEncoder(get_config("toy").vae).train()
    logs = [train_vae(encoder, model.vae_decoder, data, recipe, math.inf, progress=False)]
    x = data.pixels(torch.arange(8))
    with torch.no_grad():
        before = model.vae_decoder(encoder(x)[0])
    mean, logvar, std = calibrate_latents(encoder, model.vae_decoder, data)
    with torch.no_grad():                                                # the scale is folded in: same images
        torch.testing.assert_close(model.vae_decoder(encoder(x)[0]), before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(encoder(x)[0], mean, rtol=1e-5, atol=1e-5)
    assert float(((mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * LATENT_SCALE).std()) == pytest.approx(1, abs=0.2)
    text = TextTable(toy_tokenizer(), torch.device("cpu"))
    logs.append(train_unet(model, data, (mean, logvar), text, recipe, math.inf, progress=False))
    logs.append(train_controlnet(model, data, (mean, logvar), text, recipe, math.inf, progress=False))
    assert [log.steps for log in logs] == [1, 1, 1]
    assert all(math.isfinite(x) for log in logs for x in log.losses)
    assert all(p.requires_grad for p in model.parameters())              # frozen only during the stage


def test_controlnet_starts_as_the_unets_encoder_with_zero_outputs():
    model = build_cnsd(get_config("toy"), seed=3)
    init_controlnet(model)
    cn, unet = model.controlnet, model.unet
    for name in ("time_embed", "input_blocks", "middle_block"):
        a, b = getattr(cn, name).state_dict(), getattr(unet, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    x, hint = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    t, context = torch.tensor([10, 900]), torch.randn(2, 77, 64)
    with torch.no_grad():
        controls = cn(x, hint, t, context)
        assert all(float(c.abs().max()) == 0.0 for c in controls)        # zero convs: no effect at the start
        assert torch.equal(unet(x, t, context, controls), unet(x, t, context))


def test_text_table_suffixes_and_prompt_dropout():
    tokenizer = toy_tokenizer()
    text = TextTable(tokenizer, torch.device("cpu"))
    combo = sample_scenes(5, seed=9).combo()
    scenes = sample_scenes(5, seed=9)
    kept = text.sample(combo, 0.0)
    for i in range(5):
        assert tokenizer.decode(kept[i]) in [tokenizer.decode(tokenizer([scenes.prompt(i) + s])[0]) for s in SUFFIXES]
    dropped = text.sample(combo, 1.0)
    assert all(tokenizer.decode(row) in [tokenizer.decode(tokenizer([u])[0]) for u in UNCOND] for row in dropped)


@pytest.mark.slow
def test_train_toy_smoke_end_to_end(tmp_path):
    """The whole command on a CPU: three stages of two steps, save, reload, evaluate (about 15 s)."""
    from course_lib.cli import main

    out = tmp_path / "toy"
    assert main(["train-toy", "--device", "cpu", "--recipe", "smoke", "--out", str(out), "--eval-n", "2",
                 "--eval-steps", "2", "--quiet"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"cnsd_toy.safetensors", "cnsd_toy.json", "evaluation.json", "loss_curve.png", "samples.png"} <= names
    card = json.loads((out / "cnsd_toy.json").read_text())
    assert card["training"]["stages"]["controlnet"]["steps"] == 2 and card["data"]["seed"] == 0
    assert set(card["evaluation"]) == {"trained", "random"} and card["evaluation"]["trained"]["n"] == 2
    assert card["command"].startswith("python -m course_lib train-toy") or card["command"]
    assert "toy weights:" in weights_status(out / "cnsd_toy.safetensors")
    load_toy(out / "cnsd_toy.safetensors")
