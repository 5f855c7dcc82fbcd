"""YOLO-World prunes: backbone and text-guided neck lose channels, the attention branches, the
region-embedding outputs and the contrastive scorers stay whole, so any vocabulary still works."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from detectkit import create_model
from detectkit.compress.prune import apply_pruned_shapes, count_macs_params, prune_model, record_shapes


def test_yolo_world_prune_keeps_the_vocabulary_path_and_replays():
    torch.manual_seed(0)
    model = create_model("yolo_world_v2_s", num_classes=3).eval()
    base, base_params = count_macs_params(model, 64)
    prune_model(model, 0.3, image_size=64)
    macs, params = count_macs_params(model, 64)
    assert macs < 0.75 * base and params < base_params
    assert model.neck.top_down_p4.cv2.conv.out_channels < 256  # the text-guided neck itself shrank
    assert model.neck.top_down_p4.attn.gl.in_features == 512  # the text projection is whole

    x = torch.rand(1, 3, 64, 64)
    model.set_text_embeddings(F.normalize(torch.randn(5, 512), dim=-1))  # a new vocabulary of 5 prompts
    boxes, scores = model(x)
    assert scores.shape[-1] == 5 and torch.isfinite(boxes).all()

    fresh = apply_pruned_shapes(create_model("yolo_world_v2_s", num_classes=3), record_shapes(model)).eval()
    fresh.load_state_dict(model.state_dict())  # strict: the replayed architecture matches
    fresh.set_text_embeddings(model.txt_feats)
    with torch.no_grad():
        assert torch.allclose(fresh(x)[1], scores, atol=1e-5)
