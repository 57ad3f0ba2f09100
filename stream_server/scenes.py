"""The named start scenes the server offers: ``GET /v1/scenes``, ``GET /v1/scenes/{id}.png`` and
``{"scene": id}`` when a session is created.

The scenes are :data:`world_model.start_scenes.START_SCENES` (frames of the procedural renderer the demo
model was trained on) at the engine's video size. Each is rendered on its first use, on a worker thread so
the event loop keeps serving, and then kept in memory as RGB (for sessions) and PNG (for browsers).
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from world_model.start_scenes import START_SCENES, StartScene, render_scene


@dataclass(frozen=True)
class _Rendered:
    rgb: np.ndarray  # (height, width, 3) uint8
    png: bytes


class SceneCatalog:
    """The start scenes at one size, rendered once each (concurrent first requests share one render)."""

    def __init__(self, width: int, height: int, scenes: tuple[StartScene, ...] = START_SCENES) -> None:
        self.width, self.height = width, height
        self._scenes = {scene.id: scene for scene in scenes}
        self._rendered: dict[str, _Rendered] = {}
        self._locks = {scene_id: asyncio.Lock() for scene_id in self._scenes}

    def listing(self) -> list[dict[str, Any]]:
        """The JSON of ``GET /v1/scenes``."""
        return [{"id": s.id, "title": s.title, "width": self.width, "height": self.height, "prompt": s.prompt} for s in self._scenes.values()]

    def __contains__(self, scene_id: object) -> bool:
        return scene_id in self._scenes

    async def rgb(self, scene_id: str) -> np.ndarray:
        """``(height, width, 3)`` uint8 RGB of a known scene (``KeyError`` for an unknown id)."""
        return (await self._get(scene_id)).rgb

    async def png(self, scene_id: str) -> bytes:
        """The scene as PNG bytes (``KeyError`` for an unknown id)."""
        return (await self._get(scene_id)).png

    async def _get(self, scene_id: str) -> _Rendered:
        scene = self._scenes[scene_id]
        async with self._locks[scene_id]:
            if scene_id not in self._rendered:
                self._rendered[scene_id] = await asyncio.to_thread(self._render, scene)
        return self._rendered[scene_id]

    def _render(self, scene: StartScene) -> _Rendered:
        rgb = render_scene(scene, self.width, self.height)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        return _Rendered(rgb, buffer.getvalue())
