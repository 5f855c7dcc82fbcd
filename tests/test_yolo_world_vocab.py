"""Per-image vocabularies (masked, not padded with '' prompts) and reparameterisation.

Uses the parity fixture's weights with the README §6 stress transform, where the text-guided
neck measurably changes outputs (with the raw random init it is at the noise floor).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detectkit import create_model
from detectkit.models.yolo_world import YoloWorld
from detectkit.models.yolo_world.head import MASKED_LOGIT
from detectkit.models.yolo_world.weights import load_ultralytics_state_dict

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "yolo_world_s_parity"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"shared test data absent: {FIXTURE}")


def stressed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        value = value.clone()
        if key.endswith("running_var"):
            value *= 0.25
        if ".attn.gl." in key:
            value *= 64
        if (
            key.startswith("model.22.cv4.")
            and key.endswith((".bias", ".logit_scale"))
            and ".norm." not in key
        ):
            value.fill_(1.0 if key.endswith("logit_scale") else 0.0)
        if key in {f"model.22.cv2.{i}.2.weight" for i in range(3)}:
            value *= 16
        out[key] = value
    return out


@pytest.fixture(scope="module")
def model() -> YoloWorld:
    state = stressed(torch.load(FIXTURE / "state_dict.pt", weights_only=True))
    net = create_model("yolo_world_v2_s")
    load_ultralytics_state_dict(net, state)
    txt = torch.load(FIXTURE / "io.pt", weights_only=True)["txt_feats"][0]
    return net.set_text_embeddings(txt).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(5))


def unit(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


@torch.no_grad()
def test_masked_batch_equals_per_image_vocabularies(model, x) -> None:
    vocab0, vocab1 = unit(5, 1), unit(3, 2)
    garbage = unit(2, 3) * 7  # padding rows that would change everything if they leaked
    text = torch.stack([vocab0, torch.cat([vocab1, garbage])])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    batch = model.head_forward(x, text=text, text_mask=mask)
    alone0 = model.head_forward(x[:1], text=vocab0)
    alone1 = model.head_forward(x[1:], text=vocab1)
    torch.testing.assert_close(batch.cls_logits[0], alone0.cls_logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.cls_logits[1, :, :3], alone1.cls_logits[0], rtol=0, atol=1e-5)
    assert (batch.cls_logits[1, :, 3:] == MASKED_LOGIT).all()
    torch.testing.assert_close(batch.reg_distri[1], alone1.reg_distri[0], rtol=0, atol=2e-5)
    for fb, f1 in zip(batch.feats, alone1.feats):
        torch.testing.assert_close(fb[1], f1[0], rtol=0, atol=1e-5)
    # without the mask the padding prompts do leak into the neck's max over prompts
    unmasked = model.head_forward(x[1:], text=text[1:])
    assert (unmasked.reg_distri[0] - alone1.reg_distri[0]).abs().max() > 1e-3
    boxes, scores = model.decode(batch)
    assert (scores[1, :, 3:] == 0).all()


def test_text_input_validation(model, x) -> None:
    with pytest.raises(ValueError, match="text_mask"):
        model.head_forward(x, text=unit(3, 0).expand(2, -1, -1), text_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="text embeddings"):
        model.head_forward(x, text=torch.randn(3, 256))
    with pytest.raises(ValueError, match="multiples of 32"):
        model.head_forward(torch.rand(1, 3, 100, 160))


@torch.no_grad()
def test_reparameterized_equals_prompt_path(model, x) -> None:
    ref_head = model.head_forward(x)
    ref = model.decode(ref_head)
    baked = copy.deepcopy(model).reparameterize()
    # the scorer is composed into the embedding conv: one c_cls -> K conv, no 512-channel map
    assert baked.head.cv3[0][-1].out_channels == 5 and isinstance(baked.head.cv4[0], torch.nn.Identity)
    assert all(layer.attn.guide.shape[0] == 5 for layer in baked.neck.attn_layers())
    baked.txt_feats.normal_()  # the baked model must not read the vocabulary any more
    head = baked.head_forward(x)
    boxes, scores = baked.decode(head)
    torch.testing.assert_close(head.cls_logits, ref_head.cls_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(boxes, ref[0], rtol=0, atol=1e-3)
    torch.testing.assert_close(scores, ref[1], rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="baked"):
        baked.set_text_embeddings(unit(2, 0))
    with pytest.raises(RuntimeError, match="baked"):
        baked.head_forward(x, text=unit(2, 0))
    fused_boxes, fused_scores = baked.fuse()(x)
    torch.testing.assert_close(fused_scores, ref[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_boxes, ref[0], rtol=0, atol=1e-3)


def test_train_mode_head_output(model, x) -> None:
    net = copy.deepcopy(model).train()
    out = net(x[:1], text=unit(4, 9))
    assert out.cls_logits.shape == (1, 525, 4) and out.reg_distri.shape == (1, 525, 64)
    assert out.bins == 16 and out.anchor_points.shape == (525, 2) and len(out.feats) == 3
    torch.testing.assert_close(out.anchor_points[0], torch.tensor([4.0, 4.0]))
    (out.cls_logits.sum() + out.reg_distri.sum()).backward()
    assert net.neck.top_down_p4.attn.gl.weight.grad is not None  # text path is trainable


@torch.no_grad()
def test_features_match_head_inputs(model, x) -> None:
    feats = model.features(x[:1])
    head = model.head_forward(x[:1])
    assert [f.shape[1] for f in feats["backbone"]] == [128, 256, 512]
    for a, b in zip(feats["neck"], head.feats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
