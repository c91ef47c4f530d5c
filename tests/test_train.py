"""Training math: length-grouped batching, schedule, optimizer groups, atomic checkpoints, precision choice
and the shared loop (learning, best checkpoint, early stopping, exact resume after a crash)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from lmloop.errors import LmloopError
from lmloop.train import (
    LoopConfig,
    _cpu_key,
    bf16_speedup,
    build_optimizer,
    find_checkpoint,
    length_grouped_batches,
    linear_warmup_decay,
    load_checkpoint,
    pad_batch,
    pick_precision,
    save_checkpoint,
    set_seed,
    train_loop,
)

# ------------------------------------------------------------------------------------------ batching


def _lengths(n: int = 5000, seed: int = 0) -> np.ndarray:
    """Token lengths shaped like real text: log-normal, median ~24, long tail clipped at 128."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(3.2, 0.6, n).astype(int), 3, 128)


def _padding_waste(batches, lengths) -> float:
    padded = sum(len(b) * lengths[b].max() for b in batches)
    real = sum(lengths[b].sum() for b in batches)
    return 1 - real / padded


@pytest.mark.parametrize(("n", "batch_size", "window"), [(1000, 32, 4), (1001, 32, 64), (7, 3, 1), (5, 8, 2)])
def test_batches_cover_every_index_exactly_once(n, batch_size, window):
    lengths = _lengths(n)
    batches = length_grouped_batches(lengths, batch_size, seed=3, epoch=0, window=window)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)
    # train_loop counts steps per epoch as ceil(n / batch_size): the batcher must produce exactly that many
    assert len(batches) == math.ceil(n / batch_size)


def test_batches_deterministic_per_seed_and_epoch():
    lengths = _lengths(800)
    a = length_grouped_batches(lengths, 16, seed=7, epoch=2)
    b = length_grouped_batches(lengths, 16, seed=7, epoch=2)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    other_epoch = length_grouped_batches(lengths, 16, seed=7, epoch=3)
    other_seed = length_grouped_batches(lengths, 16, seed=8, epoch=2)
    assert [x.tolist() for x in a] != [x.tolist() for x in other_epoch]
    assert [x.tolist() for x in a] != [x.tolist() for x in other_seed]


def test_batch_order_is_shuffled_not_sorted_by_length():
    lengths = _lengths(3200)
    batches = length_grouped_batches(lengths, 32, seed=0, epoch=0)
    longest = [int(lengths[b].max()) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_length_grouping_cuts_padding_waste():
    lengths = _lengths(5000)
    grouped = length_grouped_batches(lengths, 32, seed=1, epoch=0, window=64)
    perm = np.random.default_rng(1).permutation(len(lengths))
    random_batches = [perm[i : i + 32] for i in range(0, len(perm), 32)]
    assert _padding_waste(grouped, lengths) < 0.10
    assert _padding_waste(random_batches, lengths) > 0.30
    # window=1 degenerates to random batching: the window is what buys the saving
    ungrouped = length_grouped_batches(lengths, 32, seed=1, epoch=0, window=1)
    assert _padding_waste(ungrouped, lengths) > 0.30


def test_pad_batch():
    ids, mask = pad_batch([[1, 2, 3], [4], [5, 6]], pad_id=0)
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


# ------------------------------------------------------------------------------ schedule and optimizer


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (55, 0.5), (91, 0.1), (100, 0.0), (130, 0.0)],
)
def test_linear_warmup_decay_known_values(step, expected):
    assert linear_warmup_decay(step, total=100, warmup=10) == pytest.approx(expected)


def test_linear_warmup_decay_without_warmup():
    assert linear_warmup_decay(0, total=50, warmup=0) == pytest.approx(1.0)
    assert linear_warmup_decay(25, total=50, warmup=0) == pytest.approx(0.5)
    assert linear_warmup_decay(50, total=50, warmup=0) == 0.0


def test_build_optimizer_no_decay_on_biases_and_layernorm(tiny_bert_config):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(tiny_bert_config())
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 1e-3
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    expected_no_decay = {n for n, _ in model.named_parameters() if n.endswith(".bias") or "LayerNorm" in n}
    assert no_decay_names == expected_no_decay
    assert "bert.embeddings.LayerNorm.weight" in no_decay_names
    assert "classifier.bias" in no_decay_names
    assert "classifier.weight" in decay_names
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay_names
    # frozen parameters are in no group at all
    assert "bert.embeddings.position_embeddings.weight" not in decay_names | no_decay_names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay_names | no_decay_names == trainable
    assert not decay_names & no_decay_names


# -------------------------------------------------------------------------------------- checkpoints


def _tiny_model(cfg_factory, seed: int):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg_factory(num_labels=2))


def _take_a_step(model, opt):
    ids = torch.randint(1, 64, (4, 6))
    loss = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def _assert_same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=atol, rtol=0), k


def test_checkpoint_roundtrip(tmp_path, tiny_bert_config):
    model = _tiny_model(tiny_bert_config, 0)
    opt = build_optimizer(model, 1e-3, 0.01)
    _take_a_step(model, opt)
    ckpt = tmp_path / "checkpoints" / "last"
    save_checkpoint(ckpt, model, opt, {"step": 3, "note": "x"})
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "state.json"]
    assert find_checkpoint(ckpt) == ckpt
    after_save = torch.rand(5)  # the RNG stream right after the checkpoint

    other = _tiny_model(tiny_bert_config, 1)
    other_opt = build_optimizer(other, 1e-3, 0.01)
    with pytest.raises(AssertionError):
        _assert_same_weights(model, other)
    state = load_checkpoint(ckpt, other, other_opt)
    assert state == {"step": 3, "note": "x"}
    _assert_same_weights(model, other)
    # optimizer moments and step counts come back too
    sa, sb = opt.state_dict(), other_opt.state_dict()
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name])
    # and so does the torch RNG (dropout after resume draws the same masks)
    assert torch.equal(torch.rand(5), after_save)
    # nothing is left beside the checkpoint
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last"]


def test_checkpoint_without_optimizer(tmp_path, tiny_bert_config):
    model = _tiny_model(tiny_bert_config, 0)
    save_checkpoint(tmp_path / "best", model, None, {"step": 1, "value": 0.5})
    assert not (tmp_path / "best" / "optimizer.pt").exists()
    other = _tiny_model(tiny_bert_config, 1)
    assert load_checkpoint(tmp_path / "best", other, None) == {"step": 1, "value": 0.5}
    _assert_same_weights(model, other)


def test_leftover_tmp_dir_is_ignored_and_cleaned(tmp_path, tiny_bert_config):
    model = _tiny_model(tiny_bert_config, 0)
    ckpt = tmp_path / "last"
    save_checkpoint(ckpt, model, None, {"step": 1})
    # a kill -9 in the middle of writing the next checkpoint leaves a half-written last.tmp
    tmp = tmp_path / "last.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    (tmp / "state.json").write_text('{"step": 2')
    assert find_checkpoint(ckpt) == ckpt
    assert load_checkpoint(ckpt, _tiny_model(tiny_bert_config, 1), None) == {"step": 1}
    save_checkpoint(ckpt, model, None, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2


def test_crash_mid_swap_leaves_old_checkpoint_usable(tmp_path, tiny_bert_config):
    model = _tiny_model(tiny_bert_config, 0)
    opt = build_optimizer(model, 1e-3, 0.01)
    ckpt = tmp_path / "last"
    save_checkpoint(ckpt, model, opt, {"step": 5})
    # the crash hit after `last` was moved to `last.old` and before `last.tmp` was renamed into place
    ckpt.rename(tmp_path / "last.old")
    (tmp_path / "last.tmp").mkdir()
    (tmp_path / "last.tmp" / "state.json").write_text("{}")
    found = find_checkpoint(ckpt)
    assert found == tmp_path / "last.old"
    other = _tiny_model(tiny_bert_config, 1)
    assert load_checkpoint(found, other, build_optimizer(other, 1e-3, 0.01)) == {"step": 5}
    _assert_same_weights(model, other)
    # the next save puts a complete `last` in place and clears the debris
    save_checkpoint(ckpt, other, None, {"step": 6})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert find_checkpoint(ckpt) == ckpt


def test_newer_checkpoint_wins_over_old(tmp_path, tiny_bert_config):
    model = _tiny_model(tiny_bert_config, 0)
    save_checkpoint(tmp_path / "last", model, None, {"step": 1})
    shutil.copytree(tmp_path / "last", tmp_path / "keep")
    save_checkpoint(tmp_path / "last", model, None, {"step": 2})
    # the crash hit after the new checkpoint was renamed in, before last.old was deleted
    (tmp_path / "keep").rename(tmp_path / "last.old")
    assert find_checkpoint(tmp_path / "last") == tmp_path / "last"
    assert load_checkpoint(tmp_path / "last", model, None) == {"step": 2}


def test_find_checkpoint_none(tmp_path):
    assert find_checkpoint(tmp_path / "last") is None
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "state.json").write_text("{}")  # no weights: incomplete
    assert find_checkpoint(tmp_path / "last") is None


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_bert_config):
    from transformers import BertForSequenceClassification

    save_checkpoint(tmp_path / "last", _tiny_model(tiny_bert_config, 0), None, {"step": 1})
    bigger = BertForSequenceClassification(tiny_bert_config(num_labels=2, num_hidden_layers=3))
    with pytest.raises(LmloopError, match="checkpoint does not match the model"):
        load_checkpoint(tmp_path / "last", bigger, None)


# ---------------------------------------------------------------------------------------- precision


def test_pick_precision_explicit():
    assert pick_precision("fp32") == "fp32"
    assert pick_precision("bf16") == "bf16"


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "lmloop-home"
    monkeypatch.setenv("LMLOOP_HOME", str(home))
    return home


@pytest.mark.parametrize(
    ("ratio", "expected"), [(3.0, "bf16"), (1.2, "bf16"), (1.19, "fp32"), (0.05, "fp32")]
)
def test_pick_precision_auto_uses_cached_measurement(isolated_home, ratio, expected):
    isolated_home.mkdir()
    (isolated_home / "hardware.json").write_text(json.dumps({_cpu_key(): ratio, "other|machine": 9.0}))
    assert bf16_speedup() == ratio
    assert pick_precision("auto") == expected


def test_bf16_speedup_measures_and_caches(isolated_home):
    isolated_home.mkdir()
    cache = isolated_home / "hardware.json"
    cache.write_text("not json {")  # a corrupt cache is re-measured, not a crash
    ratio = bf16_speedup()
    assert ratio > 0
    known = json.loads(cache.read_text())
    assert known == {_cpu_key(): round(ratio, 3)}
    assert pick_precision("auto") == ("bf16" if known[_cpu_key()] >= 1.2 else "fp32")
    # the second call reads the cache (a changed value proves it is not measured again)
    cache.write_text(json.dumps({_cpu_key(): 7.5}))
    assert bf16_speedup() == 7.5 and pick_precision("auto") == "bf16"


def test_pick_precision_auto_on_gpu_device():
    has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert pick_precision("auto", device="cuda") == ("bf16" if has_bf16 else "fp32")


# --------------------------------------------------------------------------------------------- loop


class _Toy:
    """A separable toy task: the class is the presence of token 2 or token 3 among filler tokens."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.seqs, ys = [], []
        for i in range(n):
            y = i % 2
            length = int(rng.integers(4, 16))
            body = rng.integers(10, 64, size=length - 1)
            body[int(rng.integers(0, length - 1))] = 2 + y
            self.seqs.append([1, *body.tolist()])
            ys.append(y)
        self.y = torch.tensor(ys)
        self.lengths = [len(s) for s in self.seqs]

    def batch(self, idx) -> dict:
        ids, mask = pad_batch([self.seqs[i] for i in idx], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": self.y[idx], "_tokens": int(mask.sum())}

    def loss(self, model) -> float:
        model.eval()
        with torch.no_grad():
            b = self.batch(np.arange(len(self.seqs)))
            out = float(_loss_fn(model, b))
        model.train()
        return out

    def accuracy(self, model) -> float:
        model.eval()
        with torch.no_grad():
            b = self.batch(np.arange(len(self.seqs)))
            pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
        return float((pred == b["labels"]).float().mean())


def _loss_fn(model, b):
    from lmloop.models import classifier_logits

    logits = classifier_logits(model, b["input_ids"], b["attention_mask"])
    return torch.nn.functional.cross_entropy(logits, b["labels"])


@pytest.fixture
def toy():
    return _Toy(64, seed=0), _Toy(32, seed=1)


def test_train_loop_learns_and_keeps_best_checkpoint(tmp_path, toy, tiny_bert_config):
    train, val = toy
    set_seed(0)
    model = _tiny_model(tiny_bert_config, 0)
    before = train.loss(model)
    logged = []
    cfg = LoopConfig(epochs=6, batch_size=8, lr=5e-3, warmup_ratio=0.1, evals_per_epoch=1, seed=0, window=4)
    res = train_loop(
        model,
        cfg=cfg,
        lengths=train.lengths,
        make_batch=train.batch,
        loss_fn=_loss_fn,
        evaluate=lambda: {"accuracy": val.accuracy(model)},
        out_dir=tmp_path,
        log=lambda m, step: logged.append((step, m)),
        progress=False,
    )
    assert res.global_step == 6 * 8 and not res.stopped_early
    assert res.examples_seen == 6 * 64
    assert res.tokens_seen == 6 * sum(train.lengths)
    after = train.loss(model)
    assert after < 0.5 * before, (before, after)
    assert res.best_metric >= 0.9
    # the best checkpoint holds the best step's metric and weights
    best = json.loads((tmp_path / "checkpoints" / "best" / "state.json").read_text())
    assert best["step"] == res.best_step and best["value"] == res.best_metric and best["metric"] == "accuracy"
    evals = [h for h in res.history if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [8, 16, 24, 32, 40, 48]
    assert max(h["eval_accuracy"] for h in evals) == res.best_metric
    first_best = next(h["step"] for h in evals if h["eval_accuracy"] == res.best_metric)
    assert res.best_step == first_best
    load_checkpoint(tmp_path / "checkpoints" / "best", model, None)
    assert val.accuracy(model) == res.best_metric
    last = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert last["step"] == res.global_step and last["total"] == 48
    # the schedule the loop used is linear_warmup_decay (warm-up 4 steps of 48)
    first = res.history[0]
    assert first["step"] == 1 and first["lr"] == pytest.approx(5e-3 * linear_warmup_decay(1, 48, 4))
    # the logger saw training loss and validation metrics at their steps
    assert (8, {"val_accuracy": evals[0]["eval_accuracy"]}) in logged
    assert any(step == 1 and "train_loss" in m for step, m in logged)


def test_train_loop_early_stopping(tmp_path, toy, tiny_bert_config):
    train, _ = toy
    set_seed(0)
    model = _tiny_model(tiny_bert_config, 0)
    calls = []

    def flat_metric():
        calls.append(1)
        return {"accuracy": 0.5}

    cfg = LoopConfig(epochs=10, batch_size=8, lr=1e-3, evals_per_epoch=2, patience=2, seed=0)
    res = train_loop(
        model,
        cfg=cfg,
        lengths=train.lengths,
        make_batch=train.batch,
        loss_fn=_loss_fn,
        evaluate=flat_metric,
        out_dir=tmp_path,
        progress=False,
    )
    # eval every 4 steps: 4 improves (first), 8 and 12 do not -> patience 2 exhausted at step 12 of 80
    assert res.stopped_early
    assert res.global_step == 12 and len(calls) == 3
    assert res.best_step == 4 and res.best_metric == 0.5
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state["stopped"] is True and state["bad_evals"] == 2


def test_train_loop_lower_is_better_metric(tmp_path, toy, tiny_bert_config):
    train, _ = toy
    set_seed(0)
    model = _tiny_model(tiny_bert_config, 0)
    values = iter([0.9, 0.7, 0.8, 0.6])
    cfg = LoopConfig(
        epochs=4, batch_size=8, lr=1e-3, evals_per_epoch=1, metric="loss", higher_is_better=False, seed=0
    )
    res = train_loop(
        model,
        cfg=cfg,
        lengths=train.lengths,
        make_batch=train.batch,
        loss_fn=_loss_fn,
        evaluate=lambda: {"loss": next(values)},
        out_dir=tmp_path,
        progress=False,
    )
    assert res.best_metric == 0.6 and res.best_step == 32


def test_train_loop_max_steps_overrides_epochs(tmp_path, toy, tiny_bert_config):
    train, _ = toy
    set_seed(0)
    cfg = LoopConfig(epochs=100, batch_size=8, lr=1e-3, max_steps=5, seed=0)
    res = train_loop(
        _tiny_model(tiny_bert_config, 0),
        cfg=cfg,
        lengths=train.lengths,
        make_batch=train.batch,
        loss_fn=_loss_fn,
        evaluate=None,
        out_dir=tmp_path,
        progress=False,
    )
    assert res.global_step == 5 and res.best_step is None and not res.stopped_early


class _Crash(RuntimeError):
    pass


def _run(
    toy, tiny_bert_config, out_dir, *, init_seed: int, crash_at: int | None = None, resume: bool = False
):
    """Train 2 epochs (16 steps) with a checkpoint after every step; optionally crash in make_batch
    when step ``crash_at`` + 1 is about to start (after the checkpoint of step ``crash_at``)."""
    train, val = toy
    set_seed(init_seed)
    model = _tiny_model(tiny_bert_config, init_seed)  # dropout stays on: the RNG must resume too
    calls = []

    def make_batch(idx):
        calls.append(1)
        if crash_at is not None and len(calls) == crash_at + 1:
            raise _Crash(f"injected at step {crash_at}")
        return train.batch(idx)

    cfg = LoopConfig(
        epochs=2,
        batch_size=8,
        lr=3e-3,
        warmup_ratio=0.25,
        evals_per_epoch=2,
        seed=5,
        window=2,
        checkpoint_every=1,
    )
    res = train_loop(
        model,
        cfg=cfg,
        lengths=train.lengths,
        make_batch=make_batch,
        loss_fn=_loss_fn,
        evaluate=lambda: {"accuracy": val.accuracy(model)},
        out_dir=out_dir,
        resume=resume,
        progress=False,
    )
    return model, res


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from transformers import BertConfig

    def cfg_factory(**kw):
        base = dict(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
        )
        return BertConfig(**{**base, **kw})

    toy = (_Toy(64, seed=0), _Toy(32, seed=1))
    model, res = _run(toy, cfg_factory, tmp_path_factory.mktemp("uninterrupted"), init_seed=0)
    return toy, model, res


@pytest.mark.parametrize(
    ("crash_at", "debris"),
    [(5, "none"), (8, "none"), (11, "only_old"), (11, "tmp_left")],
)
def test_exact_resume_after_crash(tmp_path, tiny_bert_config, uninterrupted, capsys, crash_at, debris):
    toy, reference, ref_res = uninterrupted
    assert ref_res.global_step == 16
    with pytest.raises(_Crash):
        _run(toy, tiny_bert_config, tmp_path, init_seed=0, crash_at=crash_at)
    last = tmp_path / "checkpoints" / "last"
    assert json.loads((last / "state.json").read_text())["step"] == crash_at
    if debris == "only_old":  # the crash hit mid-swap: only last.old is complete
        last.rename(last.with_name("last.old"))
    elif debris == "tmp_left":  # the crash hit while writing the next checkpoint
        shutil.copytree(last, last.with_name("last.tmp"))
        (last.with_name("last.tmp") / "model.safetensors").write_bytes(b"truncated")

    capsys.readouterr()
    # a different init seed proves that weights and RNG come from the checkpoint
    model, res = _run(toy, tiny_bert_config, tmp_path, init_seed=123, resume=True)
    err = capsys.readouterr().err
    assert (
        f"resumed from {tmp_path / 'checkpoints' / ('last.old' if debris == 'only_old' else 'last')}" in err
    )
    assert f"at step {crash_at}/16" in err

    assert res.global_step == 16
    assert res.examples_seen == ref_res.examples_seen and res.tokens_seen == ref_res.tokens_seen
    assert res.best_step == ref_res.best_step and res.best_metric == ref_res.best_metric
    assert res.history == ref_res.history
    ref_sd, sd = reference.state_dict(), model.state_dict()
    worst = max(float((ref_sd[k] - sd[k]).abs().max()) for k in ref_sd)
    assert worst < 1e-6


def test_resume_with_another_schedule_is_refused(tmp_path, toy, tiny_bert_config):
    train, _ = toy
    set_seed(0)
    model = _tiny_model(tiny_bert_config, 0)
    kw = dict(lengths=train.lengths, make_batch=train.batch, loss_fn=_loss_fn, evaluate=None, progress=False)
    train_loop(
        model, cfg=LoopConfig(epochs=1, batch_size=8, lr=1e-3, checkpoint_every=2), out_dir=tmp_path, **kw
    )
    with pytest.raises(LmloopError, match=r"different schedule/data \(steps 8 vs 16"):
        train_loop(
            model, cfg=LoopConfig(epochs=2, batch_size=8, lr=1e-3), out_dir=tmp_path, resume=True, **kw
        )


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, toy, tiny_bert_config, capsys):
    train, _ = toy
    set_seed(0)
    res = train_loop(
        _tiny_model(tiny_bert_config, 0),
        cfg=LoopConfig(epochs=1, batch_size=16, lr=1e-3),
        lengths=train.lengths,
        make_batch=train.batch,
        loss_fn=_loss_fn,
        evaluate=None,
        out_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert res.global_step == 4
    assert "no checkpoint in" in capsys.readouterr().err
