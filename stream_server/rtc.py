"""WebRTC for one session: offer in, answer out; the ``control`` data channel; connection events.

Two aiortc details matter for latency and quality:

* mDNS candidates. Browsers hide local addresses behind ``<uuid>.local`` host candidates, and aiortc
  resolves each one inside ``setRemoteDescription`` (aioice waits up to 1 s per name when nobody
  answers), delaying the answer. We take ``.local`` candidates (and ``a=end-of-candidates``) out of the
  offer before applying it and add them afterwards in the background with ``addIceCandidate``. The
  connection does not wait for them: the browser's checks reach our host candidates and aioice learns
  the browser's address as a peer-reflexive candidate.
* Bitrate. aiortc's encoders start at 0.5-1 Mbps and cap at 1.5-3 Mbps (module constants), far too
  little for 1280x704; :func:`configure_bitrates` scales them to the model's resolution and frame rate.
  H.264 is preferred over VP8 when the browser offers both.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Awaitable, Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.codecs import h264, vpx
from aiortc.sdp import candidate_from_sdp

from .media import SessionVideoTrack
from .metrics import ServerMetrics
from .sessions import Session, SessionRegistry

log = logging.getLogger(__name__)

_MDNS_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ [A-Za-z0-9-]+\.local \d+ ")
_BITS_PER_PIXEL = 0.12  # H.264 at this many bits per pixel per frame looks clean on generated video


def ice_server(url: str) -> RTCIceServer:
    """``stun:host:port``, or ``turn:user:credential@host:port`` (credentials before ``@``) for TURN."""
    scheme, _, rest = url.partition(":")
    if "@" not in rest:
        return RTCIceServer(urls=url)
    auth, _, address = rest.rpartition("@")
    username, _, credential = auth.partition(":")
    return RTCIceServer(urls=f"{scheme}:{address}", username=username, credential=credential)


class OfferError(ValueError):
    """The offer cannot be answered (bad SDP, no video section)."""


def configure_bitrates(width: int, height: int, fps: int) -> None:
    """Scale aiortc's encoder bitrate limits (module constants) to ``width`` x ``height`` at ``fps``."""
    target = int(_BITS_PER_PIXEL * width * height * fps)  # 1280x704 at 16 fps: ~1.7 Mbps
    for codec in (h264, vpx):
        codec.MIN_BITRATE = max(200_000, target // 4)
        codec.DEFAULT_BITRATE = max(500_000, target)
        codec.MAX_BITRATE = max(1_000_000, 4 * target)


def split_mdns_candidates(sdp: str) -> tuple[str, list[tuple[int, str]], bool]:
    """Remove ``.local`` candidates and end-of-candidates from ``sdp``.

    Returns the remaining SDP, the removed candidates as ``(m-line index, candidate text)``, and
    whether any media section signalled end-of-candidates.
    """
    kept: list[str] = []
    removed: list[tuple[int, str]] = []
    ended = False
    mline = -1
    for line in sdp.splitlines():
        if line.startswith("m="):
            mline += 1
        if _MDNS_CANDIDATE.match(line):
            removed.append((mline, line[len("a=candidate:"):]))
            continue
        if line == "a=end-of-candidates":
            ended = True
            continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n", removed, ended


class RtcConnection:
    """One peer connection carrying a session's video track and control channel."""

    def __init__(self, session: Session, registry: SessionRegistry, metrics: ServerMetrics, *, fps: int,
                 ice_servers: tuple[str, ...]) -> None:
        self.session = session
        self.registry = registry
        self.prefix = f"session {session.id[:8]}"
        servers = [ice_server(url) for url in ice_servers]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.track = SessionVideoTrack(session, fps, metrics)
        self._background: set[asyncio.Task] = set()
        self._closed = False
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("datachannel", self._on_datachannel)

    async def accept(self, offer_sdp: str) -> str:
        """Apply the client's offer and return our answer's SDP; raises :class:`OfferError`."""
        if "m=video" not in offer_sdp:
            raise OfferError("the offer has no video section; add a recvonly video transceiver")
        sdp, mdns, ended = split_mdns_candidates(offer_sdp)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except (ValueError, KeyError, IndexError) as exc:
            raise OfferError(f"cannot apply the offer: {exc}") from None
        video = next((t for t in self.pc.getTransceivers() if t.kind == "video"), None)
        if video is None:
            raise OfferError("the offer has no usable video section")
        video.direction = "sendonly"
        video.sender.replaceTrack(self.track)
        codecs = RTCRtpSender.getCapabilities("video").codecs
        preferred = [c for c in codecs if c.mimeType == "video/H264"] + [c for c in codecs if c.mimeType != "video/H264"]
        video.setCodecPreferences(preferred)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        if mdns or ended:
            self._spawn(self._add_late_candidates(mdns, ended))
        return self.pc.localDescription.sdp

    async def _add_late_candidates(self, candidates: list[tuple[int, str]], ended: bool) -> None:
        for mline, text in candidates:
            candidate = candidate_from_sdp(text)
            candidate.sdpMLineIndex = mline
            try:
                await self.pc.addIceCandidate(candidate)
            except Exception:  # a name that does not resolve only loses one candidate
                log.debug("%s: mDNS candidate %s not added", self.prefix, text, exc_info=True)
        if ended and not self._closed:
            await self.pc.addIceCandidate(None)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        log.info("%s: connection %s", self.prefix, state)
        if state == "connected":
            self.registry.connected(self.session, self)
        elif state in ("failed", "closed"):
            self.registry.disconnected(self.session, self)

    def _on_datachannel(self, channel) -> None:
        if channel.label != "control":
            log.info("%s: ignoring data channel %r", self.prefix, channel.label)
            return
        wrapped = _DataChannel(channel)
        self.session.channels.add(wrapped)
        channel.on("message", lambda text: self.registry.message(self.session, text, wrapped.send))
        channel.on("close", lambda: self.session.channels.discard(wrapped))

    async def close(self) -> None:
        """Close the peer connection (stops the track); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await self.pc.close()


class _DataChannel:
    """The ``control`` data channel as a session :class:`~stream_server.sessions.Channel`."""

    def __init__(self, channel) -> None:
        self._channel = channel

    def send(self, text: str) -> None:
        if self._channel.readyState == "open":
            self._channel.send(text)

    def close(self) -> None:
        self._channel.close()


def offer_handler_factory(registry: SessionRegistry, metrics: ServerMetrics, *, fps: int,
                          ice_servers: tuple[str, ...]) -> Callable[[Session, str], Awaitable[str]]:
    """A function ``(session, offer_sdp) -> answer_sdp`` that wires a new connection into the registry."""

    async def answer(session: Session, offer_sdp: str) -> str:
        connection = RtcConnection(session, registry, metrics, fps=fps, ice_servers=ice_servers)
        try:
            answer_sdp = await connection.accept(offer_sdp)
        except BaseException:
            await connection.close()
            raise
        await registry.offered(session, connection)
        return answer_sdp

    return answer
