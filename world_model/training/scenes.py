"""Procedural 3-D scenes and a vectorised CPU ray caster, to render training clips with exact poses.

A :class:`Scene` is drawn from a seed: a textured ground plane, a sky that depends only on the ray
direction (gradient, sun disc, clouds) and 16 to 24 (by default) spheres, boxes and vertical cylinders resting on
the ground around the start point. :meth:`Scene.render` casts one ray per pixel of a pinhole camera in
the project's convention (OpenCV camera-to-world pose: +X right, +Y down, +Z forward; intrinsics
``[fx, fy, cx, cy]``; pixel ``(u, v)`` at integer coordinates, as in :func:`world_model.camera.pixel_rays`,
so the pixel at ``(cx, cy)`` looks along the pose's +Z).

Since +Y points down, the ground is the plane ``y = +h`` with ``h`` the camera height. Shading is
Lambertian from one directional sun plus a hemispherical ambient term; ground shadows are baked once per
scene (the scene is static and the light directional), objects shade themselves but cast no shadow on
each other. Distance fog fades everything into the sky colour, which hides the aliasing of far texture
at the horizon. Textures are sampled from mip pyramids with a per-pixel level for the same reason.

Speed comes from three things: float32 everywhere, one numpy pass over all pixels for the ground and the
sky, and objects intersected only inside the screen rectangle their bounding sphere projects to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_EPS = 1e-4  # smallest accepted ray parameter; keeps shadow rays from hitting their own surface
_SKY = -1  # hit id of pixels that see the sky
_GROUND = -2  # hit id of pixels that see the ground


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn; lengths are world units (the camera moves 0.025 per frame at full speed)."""

    num_objects: tuple[int, int] = (16, 24)  # inclusive range of the object count
    clear_radius: float = 3.0  # no object within this distance of the start point: a 97-frame clip moves <= 2.4
    max_radius: float = 24.0  # objects are scattered up to this distance from the start point
    camera_height: tuple[float, float] = (1.0, 1.6)  # range of h: the ground is the plane y = +h
    sun_elevation_deg: tuple[float, float] = (25.0, 65.0)  # range of the sun's angle above the horizon
    fog_distance: tuple[float, float] = (18.0, 30.0)  # range of the e-folding distance of the fog
    ground_texel: float = 0.05  # world size of one ground texel; the texture tiles every 512 texels (25.6 units)
    shadow_texel: float = 0.05  # world size of one texel of the baked ground shadow map
    shadows: bool = True  # bake ground shadows (costs ~0.1 s per scene, nothing per frame)


# --- textures ------------------------------------------------------------------------------------


def periodic_noise(rng: np.random.Generator, size: int, slope: float, channels: int = 1) -> np.ndarray:
    """Tileable ``(size, size, channels)`` noise in [0, 1] with a ``1 / f ** slope`` amplitude spectrum.

    A random spectrum on the discrete Fourier grid gives a periodic field, so the tile repeats without
    seams; drawing the spectrum directly needs one inverse real FFT per channel.
    """
    fy = np.fft.fftfreq(size).astype(np.float32)
    fx = np.fft.rfftfreq(size).astype(np.float32)
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    radius[0, 0] = 1.0
    gain = radius ** (-slope)
    gain[0, 0] = 0.0
    shape = (channels, size, size // 2 + 1)
    spectrum = (rng.standard_normal(shape, np.float32) + 1j * rng.standard_normal(shape, np.float32)) * gain
    field = np.fft.irfft2(spectrum, s=(size, size))
    field = field / (np.abs(field).max(axis=(1, 2), keepdims=True) + 1e-12)
    return (0.5 + 0.5 * field).transpose(1, 2, 0).astype(np.float32)


class MipTexture:
    """A square, power-of-two, tiling texture with its box-filtered mip pyramid in one flat array.

    Sampling picks a level per pixel from the pixel's footprint (in texels) and blends the two nearest
    levels (nearest texel within each), so minified texture averages out instead of aliasing.
    """

    def __init__(self, image: np.ndarray) -> None:
        size = image.shape[0]
        if image.shape[0] != image.shape[1] or size & (size - 1):
            raise ValueError(f"texture must be square with a power-of-two side; got {image.shape}")
        levels, offsets, flat, level = [], [], [], image.astype(np.float32)
        offset = 0
        while True:
            levels.append(level.shape[0])
            offsets.append(offset)
            flat.append(level.reshape(-1, level.shape[-1]))
            offset += level.shape[0] ** 2
            if level.shape[0] == 1:
                break
            n = level.shape[0] // 2
            level = level.reshape(n, 2, n, 2, -1).mean(axis=(1, 3))  # 2x2 box filter
        self.size = size
        self.num_levels = len(levels)
        self.offsets = np.array(offsets, dtype=np.int64)
        self.texels = np.concatenate(flat)  # (sum of level areas, C)

    def sample(self, u: np.ndarray, v: np.ndarray, footprint: np.ndarray) -> np.ndarray:
        """Colours ``(N, C)`` at texel coordinates ``u, v`` (any real values; the texture tiles) for a
        pixel footprint of ``footprint`` texels: bilinear within a level, linear between two levels."""
        level = np.clip(np.log2(np.maximum(footprint, 1e-6)), 0.0, self.num_levels - 1.001)
        low = level.astype(np.int64)
        frac = (level - low)[:, None]
        return (1.0 - frac) * self._bilinear(u, v, low) + frac * self._bilinear(u, v, low + 1)

    def _bilinear(self, u: np.ndarray, v: np.ndarray, level: np.ndarray) -> np.ndarray:
        side = self.size >> level
        scale = 1.0 / side.astype(np.float32) * self.size  # level-0 texels per texel of this level
        us, vs = u / scale - 0.5, v / scale - 0.5  # texel centres sit at half-integers
        u0, v0 = np.floor(us), np.floor(vs)
        fu, fv = (us - u0)[:, None], (vs - v0)[:, None]
        iu0, iv0 = u0.astype(np.int64) % side, v0.astype(np.int64) % side
        iu1, iv1 = (iu0 + 1) % side, (iv0 + 1) % side
        base = self.offsets[level]
        rows0, rows1 = base + iv0 * side, base + iv1 * side
        top = (1.0 - fu) * self.texels[rows0 + iu0] + fu * self.texels[rows0 + iu1]
        bottom = (1.0 - fu) * self.texels[rows1 + iu0] + fu * self.texels[rows1 + iu1]
        return (1.0 - fv) * top + fv * bottom


# --- primitives ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """Surface colour of an object: a two-colour pattern in the object's local coordinates."""

    base: tuple[float, float, float]
    accent: tuple[float, float, float]
    pattern: str  # "plain", "stripes" (horizontal bands) or "checker" (3-D checker)
    frequency: float  # pattern cycles per world unit

    def albedo(self, local: np.ndarray) -> np.ndarray:
        """RGB albedo ``(N, 3)`` at points ``local`` ``(N, 3)`` relative to the object's centre."""
        base, accent = np.array(self.base, np.float32), np.array(self.accent, np.float32)
        if self.pattern == "stripes":
            mix = 0.5 + 0.5 * np.tanh(3.0 * np.sin(2.0 * math.pi * self.frequency * local[:, 1]))
        elif self.pattern == "checker":
            mix = (np.floor(local * self.frequency).astype(np.int64).sum(axis=1) & 1).astype(np.float32)
        else:
            mix = 0.15 + 0.15 * np.sin(2.0 * math.pi * self.frequency * (local[:, 0] + local[:, 1] + local[:, 2]))
        return base + mix[:, None] * (accent - base)


@dataclass(frozen=True)
class Sphere:
    center: np.ndarray  # (3,) float32
    radius: float
    material: Material

    def bounds(self) -> tuple[np.ndarray, float]:
        return self.center, self.radius

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Ray parameter ``t`` of the first hit (``inf`` for a miss) for unit ``dirs`` ``(..., 3)``."""
        oc = origin - self.center
        b = (dirs * oc).sum(axis=-1)
        disc = b * b - ((oc * oc).sum(axis=-1) - self.radius**2)
        t = -b - np.sqrt(np.maximum(disc, 0.0))
        return np.where((disc >= 0.0) & (t > _EPS), t, np.inf)

    def normal(self, points: np.ndarray) -> np.ndarray:
        return (points - self.center) / self.radius


@dataclass(frozen=True)
class Box:
    center: np.ndarray  # (3,) float32
    half: np.ndarray  # (3,) float32 half extents (axis-aligned)
    material: Material

    def bounds(self) -> tuple[np.ndarray, float]:
        return self.center, float(np.linalg.norm(self.half))

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Slab test; ``t`` of the entry point, ``inf`` for a miss (rays never start inside a box)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / dirs
            t1 = (self.center - self.half - origin) * inv
            t2 = (self.center + self.half - origin) * inv
        t_near = np.fmax(np.fmin(t1, t2), -np.inf).max(axis=-1)  # fmin/fmax drop the NaNs of 0 * inf
        t_far = np.fmin(np.fmax(t1, t2), np.inf).min(axis=-1)
        return np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)

    def normal(self, points: np.ndarray) -> np.ndarray:
        q = (points - self.center) / self.half
        axis = np.abs(q).argmax(axis=1)
        out = np.zeros_like(points)
        out[np.arange(len(points)), axis] = np.sign(q[np.arange(len(points)), axis])
        return out


@dataclass(frozen=True)
class Cylinder:
    """A vertical cylinder (axis along Y) from ``top`` down to ``bottom`` (``top < bottom``: Y is down)."""

    center: np.ndarray  # (3,) float32; its Y is the middle height
    radius: float
    half_height: float
    material: Material

    def bounds(self) -> tuple[np.ndarray, float]:
        return self.center, math.hypot(self.radius, self.half_height)

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """First hit of the side or the top cap (the bottom cap sits on the ground and is never seen)."""
        o = origin - self.center
        ox, oy, oz = o[..., 0], o[..., 1], o[..., 2]
        dx, dy, dz = dirs[..., 0], dirs[..., 1], dirs[..., 2]
        a = np.maximum(dx * dx + dz * dz, 1e-12)
        b = ox * dx + oz * dz
        disc = b * b - a * (ox * ox + oz * oz - self.radius**2)
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        y_side = oy + t_side * dy
        side_ok = (disc >= 0.0) & (t_side > _EPS) & (np.abs(y_side) <= self.half_height)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_cap = (-self.half_height - oy) / dy
            cx, cz = ox + t_cap * dx, oz + t_cap * dz
        cap_ok = (t_cap > _EPS) & (cx * cx + cz * cz <= self.radius**2)
        return np.minimum(np.where(side_ok, t_side, np.inf), np.where(cap_ok, t_cap, np.inf))

    def normal(self, points: np.ndarray) -> np.ndarray:
        q = points - self.center
        rho = np.sqrt(q[:, 0] ** 2 + q[:, 2] ** 2)
        on_cap = np.abs(q[:, 1] + self.half_height) < np.abs(rho - self.radius)
        side = np.stack([q[:, 0] / np.maximum(rho, 1e-6), np.zeros_like(rho), q[:, 2] / np.maximum(rho, 1e-6)], axis=1)
        return np.where(on_cap[:, None], np.array([0.0, -1.0, 0.0], np.float32), side)


Primitive = Sphere | Box | Cylinder


# --- scene ---------------------------------------------------------------------------------------


def _random_colour(
    rng: np.random.Generator,
    saturation: tuple[float, float],
    value: tuple[float, float],
    hue: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """A float32 RGB colour drawn uniformly from the given HSV ranges."""
    h, s, v = rng.uniform(*hue), rng.uniform(*saturation), rng.uniform(*value)
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _random_material(rng: np.random.Generator) -> Material:
    base = _random_colour(rng, (0.3, 0.9), (0.45, 0.95))
    accent = np.clip(base * rng.uniform(0.35, 0.7) + _random_colour(rng, (0.0, 0.6), (0.0, 0.35)), 0.0, 1.0)
    pattern = str(rng.choice(["plain", "stripes", "checker"]))
    return Material(tuple(base.tolist()), tuple(accent.tolist()), pattern, float(rng.uniform(0.8, 3.0)))


def _random_object(rng: np.random.Generator, ground: float, config: SceneConfig) -> Primitive:
    """One object resting on the ground at a random spot at least ``clear_radius`` from the origin."""
    kind = rng.choice(["sphere", "box", "cylinder"], p=[0.35, 0.4, 0.25])
    if kind == "sphere":
        radius = rng.uniform(0.25, 1.2)
        extent, half_height = radius, radius
    elif kind == "box":
        half = rng.uniform([0.2, 0.2, 0.2], [1.2, 1.6, 1.2])
        extent, half_height = float(np.hypot(half[0], half[2])), half[1]
    else:
        radius, half_height = rng.uniform(0.12, 0.6), rng.uniform(0.5, 3.0)
        extent = radius
    # Denser near the start than uniform-in-area (median ~1/4 of the way out): near objects show parallax.
    near = config.clear_radius + extent
    distance = near + (config.max_radius - near) * rng.uniform() ** 2
    angle = rng.uniform(-math.pi, math.pi)
    center = np.array([distance * math.sin(angle), ground - half_height, distance * math.cos(angle)], np.float32)
    material = _random_material(rng)
    if kind == "sphere":
        return Sphere(center, float(radius), material)
    if kind == "box":
        return Box(center, half.astype(np.float32), material)
    return Cylinder(center, float(radius), float(half_height), material)


def _ground_texture(rng: np.random.Generator) -> np.ndarray:
    """A tileable 512x512 RGB ground tile: two-colour patches of noise, fine grain and a faint checker."""
    size = 512
    base = _random_colour(rng, (0.2, 0.7), (0.35, 0.7))
    other = np.clip(base * rng.uniform(0.6, 1.3, 3), 0.0, 1.0).astype(np.float32)
    patches = periodic_noise(rng, size, slope=2.2)
    grain = periodic_noise(rng, size, slope=1.0, channels=3)
    cell = size // int(rng.choice([16, 32, 64]))  # texels per checker cell: 0.4 .. 1.6 world units
    idx = np.arange(size) // cell
    checker = ((idx[:, None] + idx[None, :]) & 1).astype(np.float32)[..., None]
    mix = np.clip((patches - 0.5) * 3.0 + 0.5, 0.0, 1.0)
    colour = base + mix * (other - base)
    colour = colour * (1.0 - rng.uniform(0.1, 0.35) * checker) * (0.7 + 0.6 * grain)
    return np.clip(colour, 0.0, 1.0).astype(np.float32)


class Scene:
    """A static procedural world drawn from ``seed``; see the module docstring for what it contains."""

    def __init__(self, seed: int, config: SceneConfig = SceneConfig()) -> None:
        rng = np.random.default_rng(seed)
        self.config = config
        self.ground = float(rng.uniform(*config.camera_height))  # the ground plane is y = +ground
        elevation = math.radians(rng.uniform(*config.sun_elevation_deg))
        azimuth = rng.uniform(-math.pi, math.pi)
        self.sun = np.array(
            [math.cos(elevation) * math.sin(azimuth), -math.sin(elevation), math.cos(elevation) * math.cos(azimuth)],
            np.float32,
        )  # unit vector toward the sun
        self.fog_distance = float(rng.uniform(*config.fog_distance))
        self.zenith = _random_colour(rng, (0.35, 0.7), (0.6, 0.9), hue=(0.53, 0.66))  # blue-ish
        haze = _random_colour(rng, (0.0, 0.3), (0.85, 1.0), hue=(0.05, 0.6))
        self.horizon = self.zenith + rng.uniform(0.45, 0.8) * (haze - self.zenith)
        self.sun_colour = np.array([1.0, 0.95, 0.85], np.float32) * rng.uniform(0.9, 1.1)
        self.cloud_cover = float(rng.uniform(0.35, 0.65))
        self.ground_texture = MipTexture(_ground_texture(rng))
        self.cloud_texture = MipTexture(periodic_noise(rng, 256, slope=1.8))
        count = int(rng.integers(config.num_objects[0], config.num_objects[1] + 1))
        self.objects: list[Primitive] = [_random_object(rng, self.ground, config) for _ in range(count)]
        self.shadow_extent = config.max_radius + 8.0
        self.shadow_map = self._bake_shadows() if config.shadows else None

    # --- shadows ---

    def _bake_shadows(self) -> np.ndarray:
        """Light visibility in [0, 1] on a ground grid over ``[-extent, extent]^2`` (rows = z, cols = x).

        Each object only tests the ground texels inside the bounding box of its shadow: the projection of
        its bounding sphere along the sun direction, an ellipse at most ``r / sin(elevation)`` across.
        """
        texel, extent = self.config.shadow_texel, self.shadow_extent
        n = int(math.ceil(2 * extent / texel))
        light = np.ones((n, n), np.float32)
        sin_elev = -float(self.sun[1])
        for obj in self.objects:
            center, radius = obj.bounds()
            foot = center - self.sun * ((self.ground - center[1]) / sin_elev)  # where its centre's shadow lands
            reach = radius / sin_elev
            lo = np.clip(np.floor((foot[[0, 2]] - reach + extent) / texel).astype(int), 0, n)
            hi = np.clip(np.ceil((foot[[0, 2]] + reach + extent) / texel).astype(int) + 1, 0, n)
            if (hi <= lo).any():
                continue
            xs = (np.arange(lo[0], hi[0]) + 0.5) * texel - extent
            zs = (np.arange(lo[1], hi[1]) + 0.5) * texel - extent
            points = np.stack(np.broadcast_arrays(xs[None, :], np.float32(self.ground), zs[:, None]), axis=-1)
            hit = np.isfinite(obj.intersect(points.astype(np.float32), self.sun))
            light[lo[1] : hi[1], lo[0] : hi[0]] *= ~hit
        padded = np.pad(light, 1, mode="edge")  # 3x3 box blur: a one-texel penumbra against jaggies
        return sum(padded[i : i + n, j : j + n] for i in range(3) for j in range(3)) / 9.0

    def _ground_light(self, points: np.ndarray) -> np.ndarray:
        """Sun visibility ``(N,)`` at ground ``points`` ``(N, 3)`` from the baked map (1 outside it)."""
        if self.shadow_map is None:
            return np.ones(len(points), np.float32)
        n = self.shadow_map.shape[0]
        ix = np.floor((points[:, 0] + self.shadow_extent) / self.config.shadow_texel).astype(np.int64)
        iz = np.floor((points[:, 2] + self.shadow_extent) / self.config.shadow_texel).astype(np.int64)
        inside = (ix >= 0) & (ix < n) & (iz >= 0) & (iz < n)
        return np.where(inside, self.shadow_map[np.clip(iz, 0, n - 1), np.clip(ix, 0, n - 1)], 1.0)

    # --- sky ---

    def sky_gradient(self, dirs: np.ndarray) -> np.ndarray:
        """Horizon-to-zenith gradient with the sun's glow ``(..., 3)``; also the fog colour."""
        up = np.clip(-dirs[..., 1:2], 0.0, 1.0)
        colour = self.horizon + np.sqrt(up) * (self.zenith - self.horizon)
        glow = np.exp(40.0 * ((dirs @ self.sun)[..., None] - 1.0))
        return colour + 0.35 * glow * self.sun_colour

    def sky(self, dirs: np.ndarray, focal: float) -> np.ndarray:
        """Sky colour ``(N, 3)`` of unit directions ``(N, 3)``: gradient, sun disc and clouds (a cloud tile
        projected on a plane above; ``focal`` in pixels sets the texture's mip level)."""
        colour = self.sky_gradient(dirs)
        sun_disc = np.clip(((dirs @ self.sun) - math.cos(math.radians(1.6))) / 2e-4, 0.0, 1.0)[:, None]
        colour = colour + sun_disc * (1.5 * self.sun_colour - colour)
        up = np.maximum(-dirs[:, 1], 1e-3)
        scale = 24.0 / up  # cloud texels per unit of the direction's horizontal part
        footprint = scale / (up * focal)  # texels per pixel: grows like 1 / up^2 toward the horizon
        density = self.cloud_texture.sample(dirs[:, 0] * scale, dirs[:, 2] * scale, footprint)[:, 0]
        cover = np.clip((density - (1.0 - self.cloud_cover)) * 4.0, 0.0, 1.0)
        cover = cover * np.clip(up * 6.0, 0.0, 1.0)  # fade out toward the horizon
        return colour + cover[:, None] * (0.95 - colour)

    # --- rendering ---

    def render(self, pose: np.ndarray, intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
        """Render ``(height, width, 3)`` uint8 from the camera-to-world ``pose`` ``(4, 4)`` (OpenCV axes)
        and pinhole ``intrinsics`` ``[fx, fy, cx, cy]`` in pixels (rays as in :func:`camera_rays`)."""
        origin, dirs = _camera(pose, intrinsics, width, height)
        depth, hit = self._trace(origin, dirs, pose, intrinsics)
        image = self._shade(origin, dirs.reshape(-1, 3), depth.reshape(-1), hit.reshape(-1), float(intrinsics[0]))
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(height, width, 3)

    def depth(self, pose: np.ndarray, intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
        """Distance ``(height, width)`` float32 along each unit ray to the surface it hits; ``inf`` for sky."""
        origin, dirs = _camera(pose, intrinsics, width, height)
        return self._trace(origin, dirs, pose, intrinsics)[0]

    def _trace(
        self, origin: np.ndarray, dirs: np.ndarray, pose: np.ndarray, intrinsics: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Depth ``(H, W)`` along each ray and what it hit (object index, ``_GROUND`` or ``_SKY``)."""
        rotation = np.asarray(pose, np.float32)[:3, :3]
        intrinsics = tuple(float(k) for k in intrinsics)
        with np.errstate(divide="ignore"):
            t_ground = np.where(dirs[..., 1] > 1e-6, (self.ground - origin[1]) / dirs[..., 1], np.inf)
        depth = t_ground.astype(np.float32)
        hit = np.where(np.isfinite(depth), _GROUND, _SKY).astype(np.int32)
        for index, obj in enumerate(self.objects):
            rect = _screen_rect(obj, origin, rotation, intrinsics, dirs.shape[:2])
            if rect is None:
                continue
            rows, cols = rect
            t = obj.intersect(origin, dirs[rows, cols])
            closer = t < depth[rows, cols]
            depth[rows, cols] = np.where(closer, t, depth[rows, cols])
            hit[rows, cols] = np.where(closer, index, hit[rows, cols])
        return depth, hit

    def _shade(self, origin: np.ndarray, dirs: np.ndarray, depth: np.ndarray, hit: np.ndarray, focal: float) -> np.ndarray:
        """Colours ``(N, 3)`` of flattened rays: sky where nothing was hit, else lit surface plus fog."""
        image = np.empty((len(dirs), 3), np.float32)
        sky = hit == _SKY
        image[sky] = self.sky(dirs[sky], focal)

        ground = np.flatnonzero(hit == _GROUND)
        g_dirs, g_depth = dirs[ground], depth[ground]
        points = origin + g_dirs * g_depth[:, None]
        texel = self.config.ground_texel
        # Geometric mean of the two footprint axes: depth / focal across, that / cos(incidence) along.
        footprint = g_depth / (focal * np.sqrt(g_dirs[:, 1])) / texel
        albedo = self.ground_texture.sample(points[:, 0] / texel, points[:, 2] / texel, footprint)
        light = self._light(np.array([0.0, -1.0, 0.0], np.float32), self._ground_light(points))
        image[ground] = albedo * light

        for index, obj in enumerate(self.objects):
            pixels = np.flatnonzero(hit == index)
            if len(pixels) == 0:
                continue
            points = origin + dirs[pixels] * depth[pixels, None]
            normals = obj.normal(points)
            image[pixels] = obj.material.albedo(points - obj.center) * self._light(normals, 1.0)

        solid = ~sky
        fog = np.exp(-depth[solid] / self.fog_distance)[:, None]
        image[solid] = fog * image[solid] + (1.0 - fog) * self.sky_gradient(dirs[solid])
        return image

    def _light(self, normals: np.ndarray, visibility: np.ndarray | float) -> np.ndarray:
        """Irradiance ``(N, 3)``: sun (Lambert, times ``visibility``) plus sky ambient brighter facing up."""
        lambert = np.maximum(normals @ self.sun, 0.0) * visibility
        ambient = 0.25 + 0.15 * (-normals[..., 1])
        return ambient[..., None] * (0.5 * self.zenith + 0.5) + (0.85 * lambert)[..., None] * self.sun_colour


def camera_rays(pose: np.ndarray, intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
    """Unit world directions ``(height, width, 3)`` float32 of the pixel rays.

    Pixel ``(u, v)`` sits at integer coordinates, as in :func:`world_model.camera.pixel_rays`, so its ray
    is ``R @ ((u - cx) / fx, (v - cy) / fy, 1)`` normalised and the pixel at ``(cx, cy)`` looks along +Z.
    """
    return _camera(pose, intrinsics, width, height)[1]


def _camera(pose: np.ndarray, intrinsics: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The camera's float32 origin ``(3,)`` and unit ray directions ``(H, W, 3)``, after checking inputs."""
    pose = np.asarray(pose, np.float64)
    if pose.shape != (4, 4) or len(intrinsics) != 4 or width <= 0 or height <= 0:
        raise ValueError(
            f"need a (4, 4) pose, 4 intrinsics and a positive size; got {pose.shape}, {len(intrinsics)}, {width}x{height}"
        )
    fx, fy, cx, cy = (float(k) for k in intrinsics)
    xs = (np.arange(width, dtype=np.float32) - cx) / fx
    ys = (np.arange(height, dtype=np.float32) - cy) / fy
    cam = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None], np.float32(1.0)), axis=-1)  # (H, W, 3)
    dirs = cam @ pose[:3, :3].T.astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    return pose[:3, 3].astype(np.float32), dirs


def _screen_rect(
    obj: Primitive,
    origin: np.ndarray,
    rotation: np.ndarray,
    intrinsics: tuple[float, float, float, float],
    shape: tuple[int, int],
) -> tuple[slice, slice] | None:
    """Rows and columns of the pixels whose rays can hit ``obj``, or ``None`` if it is off screen.

    The bounding sphere's extent in ``x / z`` is that of a disc in the XZ plane, whose tangents from the
    camera have slopes ``(XZ +- r sqrt(X^2 + Z^2 - r^2)) / (Z^2 - r^2)``; likewise in ``y / z``. A sphere
    reaching behind the camera's plane (``Z <= r``) may cover any pixel, so it gets the whole image.
    """
    center, radius = obj.bounds()
    x, y, z = (rotation.T @ (center - origin)).tolist()
    height, width = shape
    if z + radius <= 0.0:
        return None
    if z <= radius * 1.001:
        return slice(0, height), slice(0, width)
    fx, fy, cx, cy = intrinsics
    spans = []
    for lateral, focal, centre, size in ((x, fx, cx, width), (y, fy, cy, height)):
        root = radius * math.sqrt(lateral * lateral + z * z - radius * radius)
        denom = z * z - radius * radius
        low = focal * (lateral * z - root) / denom + centre
        high = focal * (lateral * z + root) / denom + centre
        start, stop = max(0, math.floor(low)), min(size, math.ceil(high) + 1)
        if start >= stop:
            return None
        spans.append(slice(start, stop))
    return spans[1], spans[0]
