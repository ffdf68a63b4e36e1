"""The artifact cache: remote model artifacts, fetched once and stored once by content in the data dir.

Layout under `DATA_DIR/artifacts/`:

- `blobs/ab/abcd…` — each distinct file, named by its SHA-256, read-only;
- `trees/<id>/` — a model directory made of hard links to blobs (what replicas load); `id` hashes the
  tree's manifest, so two sources with the same files share one tree;
- `refs/<key>.json` — one per fetched source (tracking server + pinned artifact URI): its manifest and
  tree; written last, atomically, so a fetch killed at any point leaves no ref, and a later fetch starts
  again in a fresh staging directory. Its mtime is the source's last use (LRU);
- `tmp/<key>-<uuid>/` — staging; a dead fetch's leftovers are removed when the cache next opens;
- `locks/` — `<key>.lock` serialises fetches of one source across threads and processes (five concurrent
  resolves download each file once); `cache.lock` guards commits against eviction.

Downloads go through MLflow (`mlflow.artifacts.download_artifacts`), so any store MLflow reads works.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson
from filelock import FileLock, Timeout

log = logging.getLogger("berth.registry")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class CachedRef:
    """One fetched source, as its ref file records it."""

    key: str
    artifact_uri: str
    tree: str
    files: tuple[tuple[str, str, int], ...]  # (relative path, sha256, size)
    last_used: float

    @property
    def blobs(self) -> dict[str, int]:
        return {sha: size for _, sha, size in self.files}


def evictions(refs: Iterable[CachedRef], in_use: set[str], max_bytes: int) -> list[str]:
    """The keys to evict, least recently used first, until the distinct blobs fit in `max_bytes`;
    refs in `in_use` are never chosen (the cache may stay over its bound when they alone exceed it)."""
    refs = list(refs)

    def total(kept: list[CachedRef]) -> int:
        sizes: dict[str, int] = {}
        for ref in kept:
            sizes.update(ref.blobs)
        return sum(sizes.values())

    kept = list(refs)
    out: list[str] = []
    for ref in sorted((r for r in refs if r.key not in in_use), key=lambda r: (r.last_used, r.key)):
        if total(kept) <= max_bytes:
            break
        kept.remove(ref)
        out.append(ref.key)
    return out


def tree_id(files: Iterable[tuple[str, str, int]]) -> str:
    """A tree's identity: the hash of its sorted (path, sha256) manifest."""
    digest = hashlib.sha256()
    for rel, sha, _ in sorted(files):
        digest.update(f"{rel}\0{sha}\n".encode())
    return digest.hexdigest()[:32]


class ArtifactCache:
    """Fetches remote model artifacts into `root` and bounds the space they take."""

    def __init__(self, root: Path, *, max_bytes: int, tracking_uri: str | None,
                 in_use: Callable[[], set[str]] = set) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.tracking_uri = tracking_uri
        self.in_use = in_use  # the artifact URIs served entities need now (never evicted)
        for sub in ("blobs", "trees", "refs", "tmp", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._sweep_staging()

    # Keys and paths
    def key(self, artifact_uri: str) -> str:
        return hashlib.sha256(f"{self.tracking_uri or ''}\n{artifact_uri}".encode()).hexdigest()[:32]

    def _ref_path(self, key: str) -> Path:
        return self.root / "refs" / f"{key}.json"

    def _blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / sha

    def _commit_lock(self) -> FileLock:
        return FileLock(self.root / "locks" / "cache.lock")

    # Reading
    def lookup(self, artifact_uri: str) -> Path | None:
        """The cached tree of `artifact_uri` (its last use set to now), or None. Under the commit lock: an
        eviction either ran before (a miss) or sees this use (and spares it)."""
        key = self.key(artifact_uri)
        with self._commit_lock():
            ref = self._read_ref(key)
            if ref is None:
                return None
            tree = self.root / "trees" / ref.tree
            if not tree.is_dir():
                return None
            with contextlib.suppress(OSError):
                os.utime(self._ref_path(key))
        return tree

    def refs(self) -> list[CachedRef]:
        out = []
        for path in (self.root / "refs").glob("*.json"):
            ref = self._read_ref(path.stem)
            if ref is not None:
                out.append(ref)
        return out

    def _read_ref(self, key: str) -> CachedRef | None:
        path = self._ref_path(key)
        try:
            raw = orjson.loads(path.read_bytes())
            mtime = path.stat().st_mtime
            files = tuple((str(f[0]), str(f[1]), int(f[2])) for f in raw["files"])
            return CachedRef(key, raw["artifact_uri"], raw["tree"], files, mtime)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    def usage(self) -> int:
        """Bytes the blobs take (trees are hard links to them)."""
        return sum(p.stat().st_size for p in (self.root / "blobs").glob("*/*") if p.is_file())

    # Fetching
    def fetch(self, artifact_uri: str, *, download: Callable[[str, Path], None] | None = None,
              evict: bool = True) -> Path:
        """The local model directory of `artifact_uri`, downloading it unless cached. Blocking.

        `download(artifact_uri, dest)` defaults to MLflow's; concurrent callers (threads or processes)
        wait for the one that downloads. `evict`: trim the cache to its bound after a download (a caller
        that knows what is in use better than `in_use` can tell from this thread evicts itself)."""
        hit = self.lookup(artifact_uri)
        if hit is not None:
            return hit
        key = self.key(artifact_uri)
        with FileLock(self.root / "locks" / f"{key}.lock"):
            hit = self.lookup(artifact_uri)  # fetched while we waited
            if hit is not None:
                return hit
            staging = self.root / "tmp" / f"{key}-{uuid.uuid4().hex[:12]}"
            try:
                started = time.monotonic()
                (download or self._download)(artifact_uri, staging / "download")
                tree = self._commit(key, artifact_uri, staging)
                ref = self._read_ref(key)
                log.info("fetched %s into the artifact cache (%d files, %.1f MB) in %.2f s", artifact_uri,
                         len(ref.files) if ref else 0, sum((ref.blobs if ref else {}).values()) / 1e6,
                         time.monotonic() - started,
                         extra={"event": "artifact_fetched", "artifact_uri": artifact_uri, "tree": tree.name})
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        if evict:
            self.evict()
        return tree

    async def fetch_async(self, artifact_uri: str) -> Path:
        """`fetch` for an event loop: the lookup in a thread, a download in a child process (`fetch_in_child`)."""
        hit = await asyncio.to_thread(self.lookup, artifact_uri)
        if hit is not None:
            return hit
        return await fetch_in_child(self.root, self.tracking_uri, artifact_uri)

    def _download(self, artifact_uri: str, dest: Path) -> None:
        from berth.registry.resolver import client_defaults

        client_defaults()
        import mlflow.artifacts

        dest.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dest),
                                            tracking_uri=self.tracking_uri)

    def _commit(self, key: str, artifact_uri: str, staging: Path) -> Path:
        """Move the staged download into blobs, link its tree, then write the ref (last, atomically)."""
        downloaded = staging / "download"
        root = _model_root(downloaded)
        files: list[tuple[str, str, int, bool]] = []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            sha, size = _hash_file(path)
            files.append((path.relative_to(root).as_posix(), sha, size, os.access(path, os.X_OK)))
        manifest = [(rel, sha, size) for rel, sha, size, _ in files]
        tid = tree_id(manifest)
        with self._commit_lock():
            for rel, sha, _, executable in files:
                blob = self._blob_path(sha)
                if not blob.exists():
                    blob.parent.mkdir(exist_ok=True)
                    staged = root / rel
                    os.chmod(staged, 0o500 if executable else 0o400)  # the server's user only
                    _fsync(staged)
                    os.replace(staged, blob)
            tree = self.root / "trees" / tid
            if not tree.is_dir():
                building = staging / "tree"
                for rel, sha, _, _ in files:
                    dest = building / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(self._blob_path(sha), dest)
                building.mkdir(exist_ok=True)  # a model of no files still gets its directory
                os.rename(building, tree)
            doc = {"artifact_uri": artifact_uri, "tracking_uri": self.tracking_uri, "tree": tid,
                   "files": manifest, "fetched_at": time.time()}
            tmp_ref = staging / "ref.json"
            with open(tmp_ref, "wb") as fh:
                fh.write(orjson.dumps(doc))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_ref, self._ref_path(key))
            _fsync_dir(self.root / "refs")
        return tree

    # Eviction
    def evict(self, in_use_uris: set[str] | None = None, *, taken_at: float | None = None) -> list[str]:
        """Drop least-recently-used refs nobody serves (`in_use_uris`, else `in_use()`) until the cache fits
        its bound; then remove trees and blobs no ref names. Returns the evicted artifact URIs.

        `taken_at`: when `in_use_uris` was read; a ref used since (a fetch or lookup the set cannot show,
        from this process or another sharing the cache) is spared too."""
        if in_use_uris is None:
            taken_at, in_use_uris = time.time(), self.in_use()
        since = time.time() if taken_at is None else taken_at
        in_use = {self.key(uri) for uri in in_use_uris}
        with self._commit_lock():
            refs = self.refs()
            in_use |= {r.key for r in refs if r.last_used >= since}
            now = time.time()
            for ref in refs:
                if ref.key in in_use:  # in use now: its last use is now
                    with contextlib.suppress(OSError):
                        os.utime(self._ref_path(ref.key), (now, now))
            by_key = {r.key: r for r in refs}
            gone = evictions(refs, in_use, self.max_bytes)
            for key in gone:
                self._ref_path(key).unlink(missing_ok=True)
                log.info("evicted %s from the artifact cache", by_key[key].artifact_uri,
                         extra={"event": "artifact_evicted", "artifact_uri": by_key[key].artifact_uri})
            kept = [r for r in refs if r.key not in gone]
            self._collect(kept)
            if gone and sum({s: n for r in kept for s, n in r.blobs.items()}.values()) > self.max_bytes:
                log.warning("the artifact cache holds more than its bound: the models in use alone exceed it")
        return [by_key[k].artifact_uri for k in gone]

    def _collect(self, kept: list[CachedRef]) -> None:
        """Remove trees and blobs that no kept ref names (a crash mid-eviction leaves some)."""
        trees = {r.tree for r in kept}
        blobs = {sha for r in kept for sha in r.blobs}
        for tree in (self.root / "trees").iterdir():
            if tree.name not in trees:
                shutil.rmtree(tree, ignore_errors=True)
        for blob in (self.root / "blobs").glob("*/*"):
            if blob.name not in blobs:
                blob.unlink(missing_ok=True)

    def _sweep_staging(self) -> None:
        """Remove staging directories whose fetch is dead (its key's lock is free)."""
        for entry in (self.root / "tmp").iterdir():
            key = entry.name.split("-", 1)[0]
            lock = FileLock(self.root / "locks" / f"{key}.lock", timeout=0)
            try:
                with lock:
                    shutil.rmtree(entry, ignore_errors=True)
            except Timeout:
                continue  # a live fetch (this or another process) owns it


class FetchError(Exception):
    """A fetch in a child process failed; the message is its error's first line, credentials redacted."""


async def fetch_in_child(root: Path, tracking_uri: str | None, artifact_uri: str) -> Path:
    """`ArtifactCache(root).fetch(artifact_uri)` in a child process (`python -m berth.registry.cache`):
    MLflow's download threads are joined at exit, so a download in the server's own process would hold
    up its shutdown; a cancelled fetch kills the child (the commit protocol leaves nothing behind)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "berth.registry.cache", str(root), tracking_uri or "", artifact_uri,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        raise FetchError(lines[-1] if lines else f"the fetch exited with status {proc.returncode}")
    return Path(out.decode().strip().splitlines()[-1])


_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """`scheme://user:password@host` → `scheme://***@host`, wherever a URL appears in `text`."""
    return _USERINFO.sub(r"\1***@", text)


def _main(argv: list[str]) -> int:
    root, tracking_uri, artifact_uri = argv
    cache = ArtifactCache(Path(root), max_bytes=1 << 62, tracking_uri=tracking_uri or None)
    try:
        tree = cache.fetch(artifact_uri, evict=False)
    except Exception as exc:  # one line for the parent's message: never a traceback with URLs in it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(redact(first)[:1000], file=sys.stderr)
        return 1
    print(tree)
    return 0


def _model_root(downloaded: Path) -> Path:
    """MLflow downloads `…/artifacts` or `runs:/…/model` into a subdirectory named after its last part."""
    if (downloaded / "MLmodel").exists():
        return downloaded
    children = list(downloaded.iterdir()) if downloaded.is_dir() else []
    if len(children) == 1 and (children[0] / "MLmodel").exists():
        return children[0]
    raise FileNotFoundError(f"the download holds no MLmodel file ({downloaded})")


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dest)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync(path)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
