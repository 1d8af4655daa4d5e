"""Render the species of a :class:`~treeprobe.simulate.SimulatedWorld` as small images.

Each species is drawn as one coloured, patterned body on a tinted background, so
that a tiny CLIP model trained on a CPU has a known tree to learn. Visual features
are fixed, deterministic functions of the Brownian traits
(:attr:`SimulatedWorld.node_traits`) of the species and of its ancestors:

===================  =========================================  ==================
feature              read from                                  conserved within
===================  =========================================  ==================
background tint      kingdom trait[0:3]                         kingdom
body plan (outline)  phylum trait[3] -> ellipse / 3..6-gon       phylum
pattern kind         order trait[4] -> plain / striped / spotted order
body colour          species trait[0:3] (sigmoid -> RGB)        (Brownian)
pattern colour       species trait[8:11]                        (Brownian)
aspect ratio         species trait[3]                           (Brownian)
pattern frequency    species trait[5], orientation trait[6]     (Brownian)
size                 species trait[7]                           (Brownian)
===================  =========================================  ==================

(dimension ``k`` is read as ``k % trait_dim``.) Ancestral traits are what all the
descendants inherit, so they act as synapomorphies: species of one genus look alike,
kingdoms differ at a glance. Per image, position, rotation, scale and brightness
are jittered and a little pixel noise is added, so no two images are identical.

Only numpy and PIL (ImageDraw) are used; ~1,000 images of 32 px take about a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from .simulate import RANKS, SimulatedWorld

_SUPERSAMPLE = 2  # draw at 2x and downsample for anti-aliased edges

# Named colours for the made-up common names (sRGB, 0..1).
_COLOUR_NAMES = {
    "red": (0.85, 0.15, 0.15),
    "orange": (0.95, 0.55, 0.1),
    "yellow": (0.95, 0.9, 0.2),
    "olive": (0.5, 0.5, 0.15),
    "green": (0.2, 0.7, 0.25),
    "teal": (0.1, 0.55, 0.55),
    "blue": (0.2, 0.35, 0.85),
    "purple": (0.5, 0.2, 0.7),
    "pink": (0.95, 0.5, 0.7),
    "brown": (0.5, 0.3, 0.15),
    "grey": (0.5, 0.5, 0.5),
    "black": (0.1, 0.1, 0.1),
    "white": (0.92, 0.92, 0.92),
}
_SHAPES = {0: "ovoid", 3: "triangular", 4: "square", 5: "pentagonal", 6: "hexagonal"}
_PATTERNS = ("plain", "striped", "spotted")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class SpeciesLook:
    """Per-species visual features (arrays of length n_species; colours in 0..1 RGB)."""

    body_rgb: np.ndarray  # (S, 3)
    pattern_rgb: np.ndarray  # (S, 3)
    background_rgb: np.ndarray  # (S, 3)
    vertices: np.ndarray  # (S,) int: 0 = ellipse, else polygon vertex count 3..6
    aspect: np.ndarray  # (S,) height / width of the body, 0.55..1
    pattern: np.ndarray  # (S,) int index into ("plain", "striped", "spotted")
    frequency: np.ndarray  # (S,) stripes/spots per body width, 1.5..4.5
    orientation: np.ndarray  # (S,) stripe angle, radians
    size: np.ndarray  # (S,) body half-width as a fraction of the image side, 0.22..0.38
    common_name: list  # (S,) e.g. 'small red striped ovoid'

    def frame(self, species_names=None) -> pd.DataFrame:
        """The features as a DataFrame, one row per species."""
        df = pd.DataFrame(
            {
                "vertices": self.vertices,
                "aspect": self.aspect,
                "pattern": [_PATTERNS[p] for p in self.pattern],
                "frequency": self.frequency,
                "orientation": self.orientation,
                "size": self.size,
                "common_name": self.common_name,
            }
        )
        for name, arr in (("body", self.body_rgb), ("pattern", self.pattern_rgb), ("background", self.background_rgb)):
            for c, ch in enumerate("rgb"):
                df[f"{name}_{ch}"] = arr[:, c]
        if species_names is not None:
            df.insert(0, "species", list(species_names))
        return df


def _colour_name(rgb: np.ndarray) -> str:
    names = list(_COLOUR_NAMES)
    ref = np.array([_COLOUR_NAMES[n] for n in names])
    return names[int(np.argmin(((ref - rgb) ** 2).sum(axis=1)))]


def species_looks(world: SimulatedWorld) -> SpeciesLook:
    """Deterministic trait -> visual feature map for every species of ``world``.

    Traits are scaled by the standard deviation a tip trait has under the world's
    branch lengths (sqrt(sum(rank_lengths))), so features use their full range
    without saturating.
    """
    tr = world.node_traits
    anc = world.species_ancestors
    dim = world.species_traits.shape[1]
    scale = float(np.sqrt(max(sum(world.rank_lengths), 1e-12)))

    def at(rank: str, k) -> np.ndarray:
        """Trait dims ``k`` of each species' ancestor at ``rank``, scaled (S, len(k))."""
        pos = RANKS.index(rank)
        idx = np.atleast_1d(np.asarray(k)) % dim
        # an ancestor at rank r has variance sum(lengths[:r+1]); scale by its own sd
        sd = float(np.sqrt(max(sum(world.rank_lengths[: pos + 1]), 1e-12)))
        return tr[rank][anc[:, pos]][:, idx] / sd

    sp = world.species_traits / scale
    col = lambda k: sp[:, np.atleast_1d(k) % dim]  # noqa: E731

    body = _sigmoid(1.6 * col([0, 1, 2]))
    pattern_rgb = _sigmoid(1.6 * col([8, 9, 10]))
    # keep pattern colour visibly different from the body: push it towards the opposite lightness
    lum = body.mean(axis=1, keepdims=True)
    pattern_rgb = np.where(lum > 0.5, pattern_rgb * 0.45, 0.55 + 0.45 * pattern_rgb)
    background = 0.2 + 0.6 * _sigmoid(2.0 * at("kingdom", [0, 1, 2]))

    shape_code = np.digitize(at("phylum", 3)[:, 0], [-1.2, -0.4, 0.4, 1.2])  # 0..4
    vertices = np.array([0, 3, 4, 5, 6])[shape_code]
    aspect = 0.55 + 0.45 * _sigmoid(1.5 * col(3)[:, 0])
    pattern = np.digitize(at("order", 4)[:, 0], [-0.45, 0.45])  # 0 plain, 1 striped, 2 spotted
    frequency = 1.5 + 3.0 * _sigmoid(1.5 * col(5)[:, 0])
    orientation = np.pi * _sigmoid(1.5 * col(6)[:, 0])
    size = 0.22 + 0.16 * _sigmoid(1.5 * col(7)[:, 0])

    names = []
    for s in range(len(size)):
        words = []
        if size[s] < 0.26:
            words.append("small")
        elif size[s] > 0.34:
            words.append("large")
        words.append(_colour_name(body[s]))
        if pattern[s] != 0:
            words.append(_PATTERNS[pattern[s]])
        if vertices[s] == 0:
            words.append("round" if aspect[s] > 0.85 else "ovoid")
        elif vertices[s] == 4 and aspect[s] <= 0.85:
            words.append("oblong")
        else:
            words.append(_SHAPES[int(vertices[s])])
        names.append(" ".join(words))

    return SpeciesLook(
        body_rgb=body,
        pattern_rgb=pattern_rgb,
        background_rgb=background,
        vertices=vertices.astype(np.int64),
        aspect=aspect,
        pattern=pattern.astype(np.int64),
        frequency=frequency,
        orientation=orientation,
        size=size,
        common_name=names,
    )


def _outline(vertices: int, aspect: float, n_ellipse: int = 28) -> np.ndarray:
    """Body outline in body coordinates (unit half-width), (P, 2) of (x, y)."""
    if vertices == 0:
        t = np.linspace(0, 2 * np.pi, n_ellipse, endpoint=False)
    else:
        start = -np.pi / 2 + (np.pi / vertices if vertices % 2 == 0 else 0.0)  # flat base
        t = start + 2 * np.pi * np.arange(vertices) / vertices
    return np.stack([np.cos(t), aspect * np.sin(t)], axis=1)


def image_species_codes(world: SimulatedWorld, images_per_species: int | None = None) -> np.ndarray:
    """Species code of each image :func:`render_species_images` returns, int64 (N,)."""
    if images_per_species is None:
        return np.asarray(world.item_species, dtype=np.int64)
    return np.repeat(np.arange(world.n_species, dtype=np.int64), int(images_per_species))


def render_species_images(
    world: SimulatedWorld,
    image_size: int = 32,
    images_per_species: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Render images of the simulated species.

    Parameters
    ----------
    world : SimulatedWorld
    image_size : int
        Side of the square images, pixels.
    images_per_species : int or None
        None: one image per row of ``world.items`` (same order, so image ``i`` goes
        with ``world.embeddings[i]``). An int ``k``: ``k`` images of every species,
        species-major (codes: :func:`image_species_codes`).
    seed : int
        Seed for the per-image jitter (the species' look depends on the world only).

    Returns
    -------
    uint8 array (N, image_size, image_size, 3)
    """
    if image_size < 8:
        raise ValueError("image_size must be >= 8")
    codes = image_species_codes(world, images_per_species)
    look = species_looks(world)
    n = len(codes)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x696D67]))
    # per-image jitter, drawn up front (deterministic regardless of rendering details)
    shift = rng.uniform(-0.1, 0.1, size=(n, 2))  # centre offset, fraction of the side
    rot = rng.normal(0.0, np.deg2rad(12.0), size=n)  # radians
    scale = rng.uniform(0.9, 1.1, size=n)
    bright = rng.normal(1.0, 0.06, size=n)
    phase = rng.uniform(0.0, 1.0, size=(n, 2))  # pattern phase
    noise_seeds = rng.integers(0, 2**31 - 1, size=n)

    big = image_size * _SUPERSAMPLE
    # pixel centres in [-0.5, 0.5] image units
    g = (np.arange(big) + 0.5) / big - 0.5
    gx, gy = np.meshgrid(g, g)  # (big, big), y grows downwards
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    outlines = {}
    for i, s in enumerate(codes):
        v, asp = int(look.vertices[s]), float(look.aspect[s])
        key = (v, round(asp, 4))
        if key not in outlines:
            outlines[key] = _outline(v, asp)
        half = float(look.size[s]) * scale[i]
        c, sn = np.cos(rot[i]), np.sin(rot[i])
        cx, cy = shift[i]
        pts = outlines[key] * half
        px = (pts[:, 0] * c - pts[:, 1] * sn + cx + 0.5) * big
        py = (pts[:, 0] * sn + pts[:, 1] * c + cy + 0.5) * big
        poly = list(zip(px.tolist(), py.tolist()))
        mask_img = Image.new("L", (big, big), 0)
        ImageDraw.Draw(mask_img).polygon(poly, fill=255)
        mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0
        edge_img = Image.new("L", (big, big), 0)  # a dark rim so the body stands out
        ImageDraw.Draw(edge_img).line(poly + poly[:1], fill=255, width=_SUPERSAMPLE, joint="curve")
        edge = np.asarray(edge_img, dtype=np.float32)[..., None] / 255.0

        # body coordinates (unit half-width) of every pixel, for the pattern
        dx, dy = gx - cx, gy - cy
        u = (dx * c + dy * sn) / half
        w = (-dx * sn + dy * c) / half
        kind = int(look.pattern[s])
        if kind == 0:
            pat = np.zeros_like(u)
        else:
            f = float(look.frequency[s]) / 2.0  # cycles per body half-width
            if kind == 1:
                th = float(look.orientation[s])
                t = u * np.cos(th) + w * np.sin(th)
                pat = (((t * f + phase[i, 0]) % 1.0) < 0.45).astype(np.float32)
            else:
                a = (u * f + phase[i, 0]) % 1.0 - 0.5
                b = (w * f + phase[i, 1]) % 1.0 - 0.5
                pat = ((a * a + b * b) < 0.3**2).astype(np.float32)
        pat = pat[..., None]
        body = (1 - pat) * look.body_rgb[s] + pat * look.pattern_rgb[s]
        img = (1 - mask) * look.background_rgb[s] + mask * body  # (big, big, 3) in 0..1
        img = (1 - edge) * img + edge * (0.35 * look.body_rgb[s])
        small = img.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
        small = small * bright[i]
        small = small + np.random.default_rng(int(noise_seeds[i])).normal(0.0, 0.02, small.shape)
        out[i] = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
    return out


def to_pil(images) -> list:
    """uint8 array (N, H, W, 3) (or list of arrays) -> list of PIL RGB images."""
    return [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8), "RGB") for im in images]


def montage(images, ncol: int = 16, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Tile images (uint8 (N, H, W, 3) array or PIL images of one size) into one PIL image."""
    ims = to_pil(images)
    if not ims:
        raise ValueError("montage needs at least one image")
    w, h = ims[0].size
    ncol = max(1, min(int(ncol), len(ims)))
    nrow = -(-len(ims) // ncol)
    sheet = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad) + pad), background)
    for k, im in enumerate(ims):
        r, c = divmod(k, ncol)
        sheet.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def write_image_folder(
    world: SimulatedWorld,
    out_dir: str | os.PathLike,
    image_size: int = 32,
    seed: int = 0,
    images_per_species: int | None = None,
) -> pd.DataFrame:
    """Write PNGs and ``metadata.csv`` for the simulated world under ``out_dir``.

    Images go to ``out_dir/images/<Genus>/<Genus_epithet>_<image_id>.png``.
    ``metadata.csv`` has columns ``path`` (relative to ``out_dir``, i.e. to the CSV,
    '/'-separated), the 7 ranks, ``common_name`` (made-up, from the look, e.g.
    'small red striped ovoid') and ``image_id``; it is what treeprobe's metadata-CSV
    loader reads. Returns that table (paths relative).
    """
    out_dir = os.fspath(out_dir)
    images = render_species_images(world, image_size=image_size, images_per_species=images_per_species, seed=seed)
    codes = image_species_codes(world, images_per_species)
    look = species_looks(world)
    lineage = world.species_lineage.iloc[codes].reset_index(drop=True)
    paths = []
    made = set()
    for k, s in enumerate(codes):
        genus = _slug(lineage.at[k, "genus"])
        folder = os.path.join(out_dir, "images", genus)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        rel = f"images/{genus}/{_slug(world.species_names[s])}_{k:06d}.png"
        Image.fromarray(images[k], "RGB").save(os.path.join(out_dir, rel), optimize=False, compress_level=1)
        paths.append(rel)
    meta = lineage.copy()
    meta.insert(0, "path", paths)
    meta["common_name"] = [look.common_name[s] for s in codes]
    meta["image_id"] = np.arange(len(codes), dtype=np.int64)
    meta.to_csv(os.path.join(out_dir, "metadata.csv"), index=False)
    return meta
