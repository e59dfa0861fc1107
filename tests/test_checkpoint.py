"""Loading the original checkpoint layout: round trips, the real sd15 layout, and every error path."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from course_lib.cnsd import CNSD, build_cnsd, get_config
from course_lib.cnsd.checkpoint import (DDPM_BUFFERS, checkpoint_state, load_checkpoint, read_state_dict,
                                        to_course_names)

LAYOUT = Path(__file__).parent / "data" / "control_sd15_canny_layout.json"


def tiny_checkpoint(seed=1):
    state = checkpoint_state(build_cnsd(get_config("tiny"), seed=seed))
    # what the real file carries besides the course's tensors
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["first_stage_model.encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)
    state["first_stage_model.quant_conv.weight"] = torch.randn(8, 8, 1, 1)
    for name in DDPM_BUFFERS:
        state[name] = torch.rand(1000)
    return state


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt", ["pth-wrapped", "pth", "safetensors"])
def test_round_trip(tmp_path, fmt):
    state = tiny_checkpoint()
    path = tmp_path / ("ckpt.safetensors" if fmt == "safetensors" else "ckpt.pth")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state} if fmt == "pth-wrapped" else state, path)
    model = build_cnsd(get_config("tiny"), seed=99)
    report = load_checkpoint(path, model)
    assert_same_weights(model, build_cnsd(get_config("tiny"), seed=1))
    assert report.loaded == {"clip": 36, "controlnet": 340, "unet": 686, "vae_decoder": 140}
    assert sum(report.unused.values()) == 2 + 1 + len(DDPM_BUFFERS)
    assert "position_ids" in str(report)


def test_sd15_layout_maps_onto_the_model():
    """All 1484 entries of the real checkpoint: each course tensor has its name and shape, the rest is reported."""
    layout = json.loads(LAYOUT.read_text())
    assert layout["header"]["total"] == len(layout["tensors"]) == 1484
    with torch.device("meta"):
        model = CNSD(get_config("sd15"))
        fake = {name: torch.empty(shape) for name, shape, _ in layout["tensors"]}
    names = checkpoint_state(model)
    renamed, unused = to_course_names(fake)
    own = model.state_dict()
    assert renamed.keys() == own.keys()
    assert all(renamed[k].shape == own[k].shape for k in own)
    assert sum(unused.values()) == 1484 - len(own) == 1 + 13 + 108  # position_ids, DDPM, VAE encoder side
    assert {k: tuple(t.shape) for k, t in names.items()} == \
        {n: tuple(s) for n, s, _ in layout["tensors"] if n in names}


def test_missing_key_is_named(tmp_path):
    state = tiny_checkpoint()
    del state["control_model.zero_convs.3.0.weight"]
    torch.save(state, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"missing 1 .*control_model\.zero_convs\.3\.0\.weight"):
        load_checkpoint(tmp_path / "c.pth", build_cnsd(get_config("tiny")))


def test_wrong_shape_is_named_and_nothing_is_loaded(tmp_path):
    state = tiny_checkpoint()
    state["model.diffusion_model.out.2.weight"] = torch.randn(4, 32, 1, 1)
    torch.save(state, tmp_path / "c.pth")
    model = build_cnsd(get_config("tiny"), seed=5)
    with pytest.raises(ValueError, match=r"model\.diffusion_model\.out\.2\.weight.*\(4, 32, 1, 1\).*\(4, 32, 3, 3\)"):
        load_checkpoint(tmp_path / "c.pth", model)
    assert_same_weights(model, build_cnsd(get_config("tiny"), seed=5))


def test_sd15_checkpoint_into_tiny_model_fails_clearly(tmp_path):
    state = tiny_checkpoint()
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="doesn't have.*extra"):
        load_checkpoint(tmp_path / "c.pth", build_cnsd(get_config("tiny")))


def test_unknown_prefix(tmp_path):
    state = tiny_checkpoint()
    state["lora.up.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="no known sub-model.*lora"):
        load_checkpoint(tmp_path / "c.pth", build_cnsd(get_config("tiny")))


class Payload:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


@pytest.mark.parametrize("content, message", [
    (b"hello, I am a text file", "not a PyTorch checkpoint"),
    (None, "refused to unpickle"),
    (b"", "not a PyTorch checkpoint"),
])
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save({"weight": torch.zeros(1), "evil": Payload()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_state_dict(path)


def test_pickle_of_non_tensors(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="dict of tensors"):
        read_state_dict(tmp_path / "c.pth")


def test_corrupt_safetensors_and_missing_file(tmp_path):
    (tmp_path / "c.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="safetensors"):
        read_state_dict(tmp_path / "c.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_state_dict(tmp_path / "absent.pth")
