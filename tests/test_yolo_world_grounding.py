"""ODVG grounding reader and per-image vocabularies (positives + negatives + padding mask)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from detectkit.data.grounding import phrase_pool, read_odvg, sample_vocabularies
from detectkit.models.yolo_world.text import TextEncoder


def write_lines(path, items) -> None:
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n")


def test_read_both_record_kinds(tmp_path) -> None:
    path = tmp_path / "train.odvg.jsonl"
    write_lines(
        path,
        [
            {
                "filename": "a.jpg",
                "height": 100,
                "width": 200,
                "detection": {
                    "instances": [
                        {"bbox": [1, 2, 30, 40], "label": 0, "category": "dog"},
                        {"bbox": [5, 5, 50, 60], "label": 1, "category": "cat"},
                    ]
                },
            },
            {
                "filename": "b.jpg",
                "height": 90,
                "width": 90,
                "grounding": {
                    "caption": "a red ball near a dog",
                    "regions": [
                        {"bbox": [0, 0, 10, 10], "phrase": "a red ball"},
                        {"bbox": [20, 20, 80, 70], "phrase": "dog"},
                    ],
                },
            },
        ],
    )
    records = read_odvg(path, image_root=tmp_path / "images")
    assert [r.path.name for r in records] == ["a.jpg", "b.jpg"]
    assert records[0].phrases == ["dog", "cat"] and records[0].boxes.shape == (2, 4)
    assert records[1].caption == "a red ball near a dog" and records[1].phrases == ["a red ball", "dog"]
    assert phrase_pool(records) == ["a red ball", "cat", "dog"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"filename": "a.jpg", "height": 1}), "missing 'width'"),
        (
            json.dumps(
                {
                    "filename": "a.jpg",
                    "height": 9,
                    "width": 9,
                    "detection": {"instances": [{"bbox": [5, 5, 1, 1], "category": "dog"}]},
                }
            ),
            "inverted bbox",
        ),
        (json.dumps({"filename": "a.jpg", "height": 9, "width": 9}), "neither 'detection' nor 'grounding'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, bad, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"filename": "ok.jpg", "height": 9, "width": 9, "detection": {"instances": []}})
        + "\n"
        + bad
        + "\n"
    )
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        read_odvg(path)


class HashEncoder(TextEncoder):
    """Deterministic per-name vectors (a real encoder: text -> vector, no model weights needed)."""

    @property
    def id(self) -> str:
        return "hash"

    def _embed(self, names):
        self.calls = getattr(self, "calls", 0) + 1
        return torch.stack(
            [torch.randn(512, generator=torch.Generator().manual_seed(sum(map(ord, n)))) for n in names]
        )


def test_batch_vocabulary_positives_negatives_mask() -> None:
    pool = ["dog", "cat", "car", "tree", "bus", "person"]
    vocab = sample_vocabularies([["dog", "cat", "dog"], ["person"], []], pool, num_prompts=4, seed=1)
    assert vocab.mask.shape == (3, 4) and vocab.mask.all()
    assert vocab.names[0][:2] == ["dog", "cat"] and vocab.labels[0].tolist() == [0, 1, 0]
    assert vocab.names[1][0] == "person" and "person" not in vocab.names[1][1:]
    assert len(set(vocab.names[2])) == 4  # no positives: four distinct negatives
    small = sample_vocabularies([["dog", "cat", "car"], ["bus"]], ["dog", "cat", "car", "bus"], num_prompts=2)
    assert small.mask.tolist() == [[True, True, True], [True, True, False]]  # K grows for 3 positives
    assert len(small.names[1]) == 2  # padding lives in the mask only: no placeholder prompts
    assert (
        sample_vocabularies([["dog"]], pool, 4, seed=3).names
        == sample_vocabularies([["dog"]], pool, 4, seed=3).names
    )
    targets = vocab.targets(
        [torch.tensor([[0, 0, 5, 5], [1, 1, 6, 6], [2, 2, 9, 9.0]]), torch.zeros(1, 4), torch.zeros(0, 4)]
    )
    assert targets.shape == (4, 6) and targets[:, 1].tolist() == [0, 1, 0, 0] and targets[3, 0] == 1

    enc = HashEncoder()
    emb = small.embeddings(enc.encode)
    assert emb.shape == (2, 3, 512) and enc.calls == 1
    assert (emb[1, 2] == 0).all()
    torch.testing.assert_close(emb[1, 0], F.normalize(enc._embed(["bus"]), dim=-1)[0])


def test_masked_vocabulary_trains_with_v8_loss() -> None:
    from detectkit import create_model, losses

    vocab = sample_vocabularies(
        [["dog", "cat"], ["bus"]], ["dog", "cat", "bus", "car"], num_prompts=2, seed=0
    )
    assert vocab.mask.tolist() == [[True, True], [True, True]]
    vocab = sample_vocabularies([["dog", "cat", "car"], ["bus"]], ["dog", "cat", "bus", "car"], num_prompts=2)
    model = create_model("yolo_world_v2_s").train()
    text = vocab.embeddings(HashEncoder().encode)
    head = model(torch.rand(2, 3, 160, 160), text=text, text_mask=vocab.mask)
    targets = vocab.targets(
        [
            torch.tensor([[10, 10, 60, 80], [70, 20, 150, 100], [5, 90, 40, 150.0]]),
            torch.tensor([[30, 30, 120, 120.0]]),
        ]
    )
    loss_fn = losses.build_loss(model.default_loss, num_classes=vocab.mask.shape[1])
    total, items = loss_fn(head, targets, batch_size=2, class_mask=vocab.mask)
    total.sum().backward()
    assert torch.isfinite(total).all()
    assert model.neck.bottom_up_p5.attn.gl.weight.grad.abs().sum() > 0
