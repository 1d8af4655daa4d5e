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

from treeprobe._utils import RANKS
from treeprobe.simulate import SimulatedWorld

__all__ = ["SpeciesLook", "species_looks", "image_species_codes", "render_species_images", "to_pil",
           "montage", "write_image_folder"]

_SUPERSAMPLE = 2  # draw at 2x and downsample for anti-aliased edges
_MIN_IMAGE_SIZE = 8  # smallest image side accepted, pixels
_IMAGE_STREAM = 0x696D67  # 'img' in ASCII: the seed-sequence key of the per-image jitter stream
_PIXEL_NOISE_SD = 0.02  # per-pixel Gaussian noise, in units of full intensity (0..1)

# Named colours for the made-up common names (sRGB, 0..1).
_COLOUR_NAMES = dict(zip(
    ("red", "orange", "yellow", "olive", "green", "teal", "blue", "purple", "pink", "brown", "grey", "black",
     "white"),
    ((0.85, 0.15, 0.15), (0.95, 0.55, 0.1), (0.95, 0.9, 0.2), (0.5, 0.5, 0.15), (0.2, 0.7, 0.25),
     (0.1, 0.55, 0.55), (0.2, 0.35, 0.85), (0.5, 0.2, 0.7), (0.95, 0.5, 0.7), (0.5, 0.3, 0.15),
     (0.5, 0.5, 0.5), (0.1, 0.1, 0.1), (0.92, 0.92, 0.92)),
))
_SHAPES = {0: "ovoid", 3: "triangular", 4: "square", 5: "pentagonal", 6: "hexagonal"}
_PATTERNS = ("plain", "striped", "spotted")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, elementwise."""
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(kw_only=True)
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
    """The named colour nearest (squared RGB distance) to ``rgb`` (3,)."""
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

    names = [_common_name(size[s], body[s], pattern[s], vertices[s], aspect[s]) for s in range(len(size))]
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


def _common_name(size: float, body_rgb: np.ndarray, pattern: int, vertices: int, aspect: float) -> str:
    """Made-up common name of a look, e.g. 'small red striped ovoid' (size, colour, pattern, shape)."""
    words = []
    if size < 0.26:
        words.append("small")
    elif size > 0.34:
        words.append("large")
    words.append(_colour_name(body_rgb))
    if pattern != 0:
        words.append(_PATTERNS[pattern])
    if vertices == 0:
        words.append("round" if aspect > 0.85 else "ovoid")
    elif vertices == 4 and aspect <= 0.85:
        words.append("oblong")
    else:
        words.append(_SHAPES[int(vertices)])
    return " ".join(words)


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
    *,
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
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}")
    codes = image_species_codes(world, images_per_species)
    look = species_looks(world)
    n = len(codes)
    jit = _draw_jitter(seed, n)
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
        img = _draw_species(look, s, outlines[key], jit, i, gx, gy)
        small = img.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
        small = small * jit["bright"][i]
        small = small + np.random.default_rng(int(jit["noise_seeds"][i])).normal(0.0, _PIXEL_NOISE_SD, small.shape)
        out[i] = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
    return out


def _draw_jitter(seed: int, n: int) -> dict[str, np.ndarray]:
    """Per-image jitter of ``n`` images, drawn up front from the seeded image stream (so it does
    not depend on rendering details): shift (n, 2) centre offset as a fraction of the side,
    rot (n,) radians, scale (n,), bright (n,), phase (n, 2) pattern phase, noise_seeds (n,)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _IMAGE_STREAM]))
    return dict(
        shift=rng.uniform(-0.1, 0.1, size=(n, 2)),
        rot=rng.normal(0.0, np.deg2rad(12.0), size=n),
        scale=rng.uniform(0.9, 1.1, size=n),
        bright=rng.normal(1.0, 0.06, size=n),
        phase=rng.uniform(0.0, 1.0, size=(n, 2)),
        noise_seeds=rng.integers(0, 2**31 - 1, size=n),
    )


def _draw_species(look: SpeciesLook, s: int, outline: np.ndarray, jit: dict, i: int,
                  gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Image ``i`` (species ``s``) at the supersampled size: float (big, big, 3) in 0..1, before
    brightness and noise. ``gx``, ``gy``: pixel centres (big, big) in [-0.5, 0.5]."""
    big = gx.shape[0]
    half = float(look.size[s]) * jit["scale"][i]
    c, sn = np.cos(jit["rot"][i]), np.sin(jit["rot"][i])
    cx, cy = jit["shift"][i]
    pts = outline * half
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
    pat = _pattern_mask(look, s, u, w, jit["phase"][i])[..., None]
    body = (1 - pat) * look.body_rgb[s] + pat * look.pattern_rgb[s]
    img = (1 - mask) * look.background_rgb[s] + mask * body  # (big, big, 3) in 0..1
    return (1 - edge) * img + edge * (0.35 * look.body_rgb[s])


def _pattern_mask(look: SpeciesLook, s: int, u: np.ndarray, w: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """1 where species ``s``'s pattern (stripes or spots) covers a pixel of body coordinates
    (u, w), else 0; all 0 for a plain species. ``phase`` (2,): the image's pattern phase."""
    kind = int(look.pattern[s])
    if kind == 0:
        return np.zeros_like(u)
    f = float(look.frequency[s]) / 2.0  # cycles per body half-width
    if kind == 1:
        th = float(look.orientation[s])
        t = u * np.cos(th) + w * np.sin(th)
        return (((t * f + phase[0]) % 1.0) < 0.45).astype(np.float32)
    a = (u * f + phase[0]) % 1.0 - 0.5
    b = (w * f + phase[1]) % 1.0 - 0.5
    return ((a * a + b * b) < 0.3**2).astype(np.float32)


def to_pil(images) -> list:
    """uint8 array (N, H, W, 3) (or list of arrays) -> list of PIL RGB images."""
    return [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8), "RGB") for im in images]


def montage(images, ncol: int = 16, *, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Tile images (uint8 (N, H, W, 3) array or PIL images of one size) into one PIL RGB image,
    ``ncol`` per row, ``pad`` pixels of ``background`` (RGB 0..255) around each."""
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
    """``text`` with every non-alphanumeric character replaced by '_' (safe in file names)."""
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def write_image_folder(
    world: SimulatedWorld,
    out_dir: str | os.PathLike,
    image_size: int = 32,
    *,
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
