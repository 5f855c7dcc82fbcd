"""Text encoders (tiny local CLIP through the real transformers loading path), cache, vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detectkit import create_model
from detectkit.models.yolo_world.text import (
    CLIPTextEncoder,
    EmbeddingsFileEncoder,
    OpenCLIPTextEncoder,
    TextEmbeddingCache,
    TextEncoderUnavailable,
    encode_cached,
    save_embeddings,
)

transformers = pytest.importorskip("transformers")


def _byte_chars() -> list[str]:
    # CLIP's byte-level BPE alphabet: printable bytes map to themselves, the rest above 255
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A 2-layer CLIP text tower with 512-d projection and a hand-written BPE vocabulary."""
    src = tmp_path_factory.mktemp("tok")
    chars = _byte_chars()
    merges = ["d o", "do g</w>", "c a", "ca t</w>", "p e", "pe r", "per s", "pers o", "perso n</w>"]
    merged = ["do", "dog</w>", "ca", "cat</w>", "pe", "per", "pers", "perso", "person</w>"]
    vocab = chars + [c + "</w>" for c in chars] + merged + ["<|startoftext|>", "<|endoftext|>"]
    (src / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(src))
    assert tokenizer("person")["input_ids"] == [len(vocab) - 2, vocab.index("person</w>"), len(vocab) - 1]
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=512,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_clip")
    transformers.CLIPTextModelWithProjection(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_clip_encoder_loads_local_folder(tiny_clip) -> None:
    enc = CLIPTextEncoder(tiny_clip)
    emb = enc.encode(["dog", "person", "a cat"])
    assert emb.shape == (3, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert (emb[0] - emb[1]).abs().max() > 1e-3  # different names, different vectors
    # batching and padding do not change a name's vector
    torch.testing.assert_close(enc.encode(["person"])[0], emb[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        enc.encode([])
    with pytest.raises(TypeError):
        enc.encode("dog")


def test_clip_missing_gives_instructions(tmp_path) -> None:
    with pytest.raises(TextEncoderUnavailable, match="huggingface-cli download openai/clip-vit-base-patch32"):
        CLIPTextEncoder(tmp_path / "no_such_clip")


def test_open_clip_is_optional() -> None:
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(TextEncoderUnavailable, match="open_clip"):
            OpenCLIPTextEncoder()
    else:
        pytest.skip("open_clip installed; offline weights are not available here")


def test_cache_and_embeddings_file(tiny_clip, tmp_path) -> None:
    enc = CLIPTextEncoder(tiny_clip)
    cache = TextEmbeddingCache(max_entries=2)
    a = encode_cached(enc, ["dog", "cat"], cache)
    b = encode_cached(enc, ["dog", "cat"], cache)
    assert (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    encode_cached(enc, ["cat", "dog"], cache)  # order is part of the key
    assert cache.misses == 2
    path = save_embeddings(tmp_path / "vocab.pt", ["dog", "cat", "person"], enc)
    file_enc = EmbeddingsFileEncoder(path)
    torch.testing.assert_close(
        file_enc.encode(["person", "dog"]), enc.encode(["person", "dog"]), rtol=0, atol=1e-6
    )
    assert file_enc.id != enc.id
    with pytest.raises(KeyError, match="bicycle"):
        file_enc.encode(["dog", "bicycle"])


def test_set_classes_updates_vocabulary(tiny_clip) -> None:
    enc = CLIPTextEncoder(tiny_clip)
    model = create_model("yolo_world_v2_s").eval()
    assert model.num_classes == 80 and model.txt_feats.shape == (80, 512)
    model.set_classes(["dog", "person"], encoder=enc)
    assert model.num_classes == 2 and model.class_names == ["dog", "person"]
    torch.testing.assert_close(model.txt_feats, enc.encode(["dog", "person"]))
    with torch.no_grad():
        boxes, scores = model(torch.rand(1, 3, 160, 160))
    assert boxes.shape == (1, 525, 4) and scores.shape == (1, 525, 2)
    built = create_model("yolo_world_v2_s", class_names=["cat", "dog"], text_encoder=enc)
    assert built.class_names == ["cat", "dog"] and built.num_classes == 2
    with pytest.raises(ValueError, match="2 names for 3"):
        model.set_text_embeddings(torch.randn(3, 512), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[K>=1, 512\]"):
        model.set_text_embeddings(torch.randn(3, 256))


def test_state_dict_carries_vocabulary_size() -> None:
    src = create_model("yolo_world_v2_s")
    src.set_text_embeddings(torch.nn.functional.normalize(torch.randn(3, 512), dim=-1), ["a", "b", "c"])
    dst = create_model("yolo_world_v2_s")
    dst.load_state_dict(src.state_dict())
    assert dst.num_classes == 3
    torch.testing.assert_close(dst.txt_feats, src.txt_feats, rtol=0, atol=0)


@pytest.mark.slow  # a real `detectkit fit` subprocess (about 25 s on 2 cores)
def test_fit_without_clip_offline_is_one_line(tmp_path: Path) -> None:
    """`detectkit fit` of a YOLO-World recipe on a machine without CLIP (offline, empty HF cache):
    one line naming the model id, the cache folder and HF_HUB_OFFLINE; no traceback, no "internal error"."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("DETECTKIT_CLIP", "HF_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="offline")
    recipe = Path(__file__).resolve().parents[1] / "experiments" / "yolo_world_finetune.yaml"
    proc = subprocess.run([sys.executable, "-m", "detectkit", "fit", "--config", str(recipe), "--trainer.max_steps", "1",
                           "--data.synthetic.train_images", "4", "--data.synthetic.val_images", "4",
                           "--trainer.default_root_dir", str(tmp_path / "run"), "--data.cache_dir", str(tmp_path / "d")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("detectkit fit: error: ")
    for part in ("'openai/clip-vit-base-patch32'", str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE=1 is set",
                 "huggingface-cli download openai/clip-vit-base-patch32", "model.text_encoder"):
        assert part in line, line


def test_without_transformers_names_the_text_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from detectkit.errors import UserError

    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(UserError, match=r"CLIP openai/clip-vit-base-patch32\) needs transformers: pip install 'detectkit\[text\]'"):
        CLIPTextEncoder()
