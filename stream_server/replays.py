"""Replays: the HTTP endpoints over recorded sessions, and the retention policy that deletes old ones.

``GET /v1/replays/{id}`` answers the refinement state; ``/preview.mp4`` and ``/refined.mp4`` serve the
videos with HTTP Range support. A preview-only replay (its model has no refiner: ``preview_only`` in its
``meta.json``, and no job) is final: ``"state": "done"`` with ``"refined": false`` and the ``"reason"``, and
its ``refined.mp4`` is a 404 that says why. Access needs the session's token (``Authorization: Bearer`` or
``?token=``), checked against the SHA-256 stored in the recording's ``meta.json`` with a constant-time
compare, so a replay stays reachable across server restarts. Ids are matched against a strict pattern
before any path is built from them; unknown ids and ids of other sessions' recordings look the same (404
or 403 without content).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .jobs import JobQueue
from .recording import RecordingStore, token_hash, valid_session_id

log = logging.getLogger(__name__)

VIDEOS = {"preview.mp4": "preview.mp4", "refined.mp4": "refined.mp4"}  # URL name -> file in the folder


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class Replays:
    """Handlers for the ``/v1/replays`` routes of one data dir."""

    def __init__(self, store: RecordingStore, jobs: JobQueue) -> None:
        self.store = store
        self.jobs = jobs

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/replays/{id}", self.status)
        app.router.add_get("/v1/replays/{id}/{name}", self.video)

    async def _authorized(self, request: web.Request) -> tuple[str, dict[str, Any]] | web.Response:
        """(id, meta) of the replay named in the path if the request carries its token, else the error answer."""
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else request.query.get("token", "")
        if not token:
            return _error(401, "unauthorized", "send the session token as 'Authorization: Bearer <token>' or ?token=")
        session_id = request.match_info["id"]
        meta = await asyncio.to_thread(self.store.read_meta, session_id) if valid_session_id(session_id) else None
        if meta is None:
            return _error(404, "not_found", "no replay for this session")
        if not hmac.compare_digest(token_hash(token).encode(), str(meta.get("token_sha256", "")).encode()):
            return _error(403, "forbidden", "wrong token for this replay")
        return session_id, meta

    async def status(self, request: web.Request) -> web.Response:
        found = await self._authorized(request)
        if isinstance(found, web.Response):
            return found
        session_id, meta = found
        job = await asyncio.to_thread(self.jobs.get, session_id)
        folder = self.store.folder(session_id)
        files = {}
        for name, file in VIDEOS.items():
            path = folder / file
            if path.is_file():
                files[name.split(".")[0]] = {"url": f"/v1/replays/{session_id}/{name}", "bytes": path.stat().st_size}
        preview_only = meta.get("preview_only") if job is None else None
        if preview_only:
            state, progress = "done", 1.0
        else:
            state, progress = ("recording", 0.0) if job is None else (job.state, round(job.progress, 4))
        body: dict[str, Any] = {
            "state": state, "progress": progress, "files": files, "frames": meta.get("frames"), "fps": meta["fps"],
            "width": meta["width"], "height": meta["height"],
        }
        if preview_only:
            body.update(refined=False, reason=preview_only)
        if job is not None and job.error is not None:
            body["error"] = job.error
        return web.json_response(body)

    async def video(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in VIDEOS:
            return _error(404, "not_found", f"a replay has {' and '.join(VIDEOS)}")
        found = await self._authorized(request)
        if isinstance(found, web.Response):
            return found
        session_id, meta = found
        path = self.store.folder(session_id) / VIDEOS[name]
        if not path.is_file():
            if name == "refined.mp4" and meta.get("preview_only"):
                return _error(404, "not_refined", f"this replay is preview-only ({meta['preview_only']}): "
                              f"download preview.mp4")
            what = "the session is still recording" if name == "preview.mp4" else "the refined video is not ready"
            return _error(404, "not_ready", what)
        return web.FileResponse(path, headers={"Content-Type": "video/mp4", "Cache-Control": "private, no-store"})


# -- retention --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    ttl_seconds: float | None = None  # delete replays ended longer ago than this
    max_bytes: int | None = None  # then delete the oldest until all replays fit in this many bytes

    @property
    def active(self) -> bool:
        return self.ttl_seconds is not None or self.max_bytes is not None


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # renamed or deleted while we looked
            pass
    return total


def _age_key(store: RecordingStore, session_id: str) -> float:
    """When the replay was last touched: its end, or for one never closed its last write."""
    meta = store.read_meta(session_id)
    if meta is not None and meta.get("ended_at") is not None:
        return float(meta["ended_at"])
    folder = store.folder(session_id)
    return max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)


def apply_retention(store: RecordingStore, jobs: JobQueue, policy: Retention, *, keep: frozenset[str] = frozenset(),
                    now: float | None = None) -> list[str]:
    """Delete replays (files and job) by ``policy``, oldest first, never those in ``keep`` (live
    sessions); returns the deleted ids."""
    if not policy.active:
        return []
    now = time.time() if now is None else now
    ages = sorted((_age_key(store, sid), sid) for sid in store.session_ids() if sid not in keep)
    deleted = []
    if policy.ttl_seconds is not None:
        deleted = [sid for age, sid in ages if now - age > policy.ttl_seconds]
    remaining = [sid for _, sid in ages if sid not in deleted]
    if policy.max_bytes is not None:
        sizes = {sid: _folder_bytes(store.folder(sid)) for sid in remaining}
        total = sum(sizes.values()) + sum(_folder_bytes(store.folder(sid)) for sid in keep if store.folder(sid).is_dir())
        for sid in remaining:
            if total <= policy.max_bytes:
                break
            deleted.append(sid)
            total -= sizes[sid]
    for sid in deleted:
        jobs.delete(sid)
        shutil.rmtree(store.folder(sid), ignore_errors=True)
        log.info("replay %s deleted by the retention policy", sid[:8])
    return deleted


async def run_retention(store: RecordingStore, jobs: JobQueue, policy: Retention, live: dict, interval: float) -> None:
    """Apply ``policy`` every ``interval`` seconds (``live``: the server's live sessions, kept)."""
    while True:
        try:
            await asyncio.to_thread(apply_retention, store, jobs, policy, keep=frozenset(live))
        except Exception:
            log.exception("replay retention failed")
        await asyncio.sleep(interval)
