"""The exact [CLS]-only fast forward (parity of logits and gradients with the HF forward), its fallback
for other architectures, and safe loading (no remote code, safetensors only)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmloop.models import classifier_logits, load_classifier, supports_fast_path


def _padded_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 11), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    for row, keep in enumerate([11, 7, 3, 9]):
        mask[row, keep:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _bert(tiny_bert_config, seed: int = 0, **overrides):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    # a wide init so the logits are far from zero and a masking mistake shows up clearly
    overrides.setdefault("initializer_range", 0.3)
    return BertForSequenceClassification(tiny_bert_config(num_labels=3, **overrides))


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_fast_path_matches_hf_forward_with_padding(tiny_bert_config):
    model = _bert(tiny_bert_config).eval()
    assert supports_fast_path(model)
    ids, mask = _padded_batch(64)
    with torch.no_grad():
        fast = classifier_logits(model, ids, mask)
        hf = model(input_ids=ids, attention_mask=mask).logits
    assert fast.shape == (4, 3)
    assert hf.abs().max() > 0.1  # not a degenerate comparison
    assert (fast - hf).abs().max().item() < 1e-5
    # padding really is masked: changing what sits under the mask changes nothing
    ids2 = ids.clone()
    ids2[mask == 0] = 42
    with torch.no_grad():
        fast2 = classifier_logits(model, ids2, mask)
        unmasked = classifier_logits(model, ids2, torch.ones_like(mask))
    assert (fast2 - fast).abs().max().item() < 1e-6
    assert (unmasked - fast).abs().max().item() > 1e-3


def test_fast_false_is_exactly_the_hf_forward(tiny_bert_config):
    model = _bert(tiny_bert_config).eval()
    ids, mask = _padded_batch(64)
    with torch.no_grad():
        assert torch.equal(
            classifier_logits(model, ids, mask, fast=False), model(input_ids=ids, attention_mask=mask).logits
        )


def test_fast_path_gradients_match_hf(tiny_bert_config):
    model = _no_dropout(_bert(tiny_bert_config)).train()
    ids, mask = _padded_batch(64, seed=1)
    labels = torch.tensor([0, 1, 2, 1])

    def grads(fast: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logits = classifier_logits(model, ids, mask, fast=fast)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, hf = grads(True), grads(False)
    assert fast.keys() == hf.keys()
    assert "bert.encoder.layer.1.output.dense.weight" in fast and "classifier.weight" in fast
    worst = max((fast[k] - hf[k]).abs().max().item() for k in hf)
    assert worst < 1e-5
    assert max(g.abs().max().item() for g in hf.values()) > 1e-3


def test_fast_path_in_train_mode_uses_dropout(tiny_bert_config):
    model = _bert(tiny_bert_config, hidden_dropout_prob=0.5).train()
    ids, mask = _padded_batch(64)
    torch.manual_seed(0)
    a = classifier_logits(model, ids, mask)
    b = classifier_logits(model, ids, mask)
    assert (a - b).abs().max().item() > 1e-4


def test_fast_path_on_the_real_minilm(minilm_dir):
    torch.manual_seed(0)
    tok, model = load_classifier(str(minilm_dir), labels=["a", "b"])
    model.eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    assert supports_fast_path(model)
    assert model.config.id2label == {0: "a", 1: "b"} and model.config.label2id == {"a": 0, "b": 1}
    enc = tok(
        ["a short one", "a considerably longer sentence that pads the others in this batch", "ok"],
        padding=True,
        return_tensors="pt",
    )
    assert int(enc["attention_mask"].sum()) < enc["attention_mask"].numel()  # there is padding
    with torch.no_grad():
        fast = classifier_logits(model, enc["input_ids"], enc["attention_mask"])
        hf = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert (fast - hf).abs().max().item() < 1e-5


def test_load_classifier_by_packaged_name(minilm_dir):
    tok, model = load_classifier("minilm-l6", labels=["neg", "neu", "pos"])
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert tok.pad_token_id == 0 and tok.vocab_size == 30522


def test_non_bert_falls_back_to_hf_forward():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
        )
    ).eval()
    assert not supports_fast_path(model)
    ids, mask = _padded_batch(64)
    with torch.no_grad():
        out = classifier_logits(model, ids, mask, fast=True)
        ref = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)


def test_other_bert_heads_are_not_fast_path(tiny_bert_config):
    from transformers import BertForMultipleChoice, BertForTokenClassification

    assert not supports_fast_path(BertForTokenClassification(tiny_bert_config()))
    assert not supports_fast_path(BertForMultipleChoice(tiny_bert_config()))


def test_fast_path_with_eager_attention_matches_or_is_disabled(tiny_bert_config):
    model = _bert(tiny_bert_config, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    ids, mask = _padded_batch(64)
    with torch.no_grad():
        fast = classifier_logits(model, ids, mask)
        hf = model(input_ids=ids, attention_mask=mask).logits
    assert (fast - hf).abs().max().item() < 1e-5


def test_load_classifier_never_trusts_remote_code(monkeypatch, tiny_model_dir):
    import transformers

    calls = []

    def fake_model(path, **kw):
        calls.append(("model", path, kw))
        return "MODEL"

    def fake_tok(path, **kw):
        calls.append(("tokenizer", path, kw))
        return "TOK"

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    assert load_classifier(str(tiny_model_dir), labels=["x", "y"]) == ("TOK", "MODEL")
    assert load_classifier(str(tiny_model_dir)) == ("TOK", "MODEL")
    assert [c[0] for c in calls] == ["tokenizer", "model", "tokenizer", "model"]
    for kind, path, kw in calls:
        assert path == str(tiny_model_dir)
        assert kw.get("trust_remote_code") is False, kind
    model_kw = calls[1][2]
    assert model_kw["use_safetensors"] is True
    assert model_kw["num_labels"] == 2
    assert model_kw["id2label"] == {0: "x", 1: "y"} and model_kw["label2id"] == {"x": 0, "y": 1}
    assert "num_labels" not in calls[3][2] and calls[3][2]["use_safetensors"] is True


def test_auto_map_code_in_a_model_dir_is_never_executed(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "PWNED"
    (model_dir / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class EvilConfig(BertConfig):\n    model_type = 'bert'\n"
        "class EvilModel(BertForSequenceClassification):\n    config_class = EvilConfig\n"
    )
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForSequenceClassification": "evil.EvilModel",
    }
    (model_dir / "config.json").write_text(json.dumps(cfg))
    try:
        _, model = load_classifier(str(model_dir))
    except (ValueError, OSError):
        model = None  # refusing is fine too; running the code is not
    assert not marker.exists()
    if model is not None:
        assert type(model).__module__.startswith("transformers.")


def test_pickle_weights_are_not_loaded(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    model_dir = tmp_path / "bin-only"
    model_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, model_dir / f.name)
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), model_dir / "pytorch_model.bin")
    from lmloop.errors import AssetError

    with pytest.raises(AssetError, match="model.safetensors"):
        load_classifier(str(model_dir))
