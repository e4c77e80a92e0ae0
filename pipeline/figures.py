"""The retrieval figure: a fixed sample of queries, each with its top-k neighbours as thumbnails, framed green
(same class as the query) or red (another class), the cosine similarity under each. Drawn with PIL.

The evaluate stage writes it for the test split (plots/retrieval.png, a DVC image plot, and an MLflow artifact).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xbmcore.atomic import atomic_path
from xbmcore.retrieval import nearest, sample_queries

# 8 queries x top 5: one screen, and enough rows to see both successes and failures.
FIGURE_QUERIES = 8
FIGURE_K = 5
FIGURE_SEED = 0
RETRIEVAL_PNG = "retrieval.png"  # under plots/, declared in dvc.yaml
SAME = (44, 160, 44)       # green: same class as the query
OTHER = (214, 39, 40)      # red: another class
QUERY = (90, 90, 90)       # grey: the query itself
BACKGROUND = (255, 255, 255)
TEXT = (30, 30, 30)
THUMB = 96   # px: a 32 px image upscaled 3x (nearest, so its pixels stay visible)
FRAME = 4    # px of coloured frame around each thumbnail
GAP = 8      # px between columns
CAPTION = 18  # px of text under each thumbnail
HEADER = 44   # px for the title and the column headings


@dataclass
class RetrievalFigure:
    image: Image.Image
    frames: np.ndarray   # rows x (1 + k) x 4: outer box (x0, y0, x1, y1) of each frame; column 0 is the query
    queries: np.ndarray  # rows: query set rows shown
    ids: np.ndarray      # rows x k: gallery rows of the neighbours, best first
    sims: np.ndarray     # rows x k
    same: np.ndarray     # rows x k bool: neighbour has the query's class


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: the same text on every machine


def fit_thumbnail(img: Image.Image, size: int) -> Image.Image:
    """Scale to fit size x size keeping the aspect ratio: nearest when enlarging (small images stay crisp)."""
    img = img.convert("RGB")
    scale = size / max(img.size)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return img.resize(new, resample)


def draw_retrieval(query_images: Sequence[Image.Image], neighbour_images: Sequence[Sequence[Image.Image]],
                   sims: np.ndarray, same: np.ndarray, query_captions: Sequence[str] | None = None,
                   title: str = "") -> tuple[Image.Image, np.ndarray]:
    """The grid: one row per query (query, then its neighbours best first). Returns (image, frames), frames
    rows x (1 + k) x 4 as in RetrievalFigure."""
    sims, same = np.asarray(sims), np.asarray(same, dtype=bool)
    rows, k = sims.shape
    if same.shape != sims.shape or len(query_images) != rows or len(neighbour_images) != rows \
            or any(len(n) != k for n in neighbour_images):
        raise ValueError(f"draw_retrieval: expected {rows} queries with {k} neighbours each (sims {sims.shape}), "
                         f"got same {same.shape}, {len(query_images)} query images and neighbour counts "
                         f"{[len(n) for n in neighbour_images]}")
    cell_w, cell_h = THUMB + 2 * FRAME, THUMB + 2 * FRAME + CAPTION
    width = GAP + (1 + k) * (cell_w + GAP) + GAP  # an extra gap after the query column
    height = HEADER + rows * (cell_h + GAP)
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(12)
    draw.text((GAP, 6), title, fill=TEXT, font=font)
    frames = np.zeros((rows, 1 + k, 4), dtype=np.int64)

    def x_of(col: int) -> int:
        return GAP + col * (cell_w + GAP) + (GAP if col > 0 else 0)

    for col, text in enumerate(["query", *(f"#{j + 1}" for j in range(k))]):
        draw.text((x_of(col) + cell_w // 2, HEADER - 4), text, fill=TEXT, font=small, anchor="ms")
    for r in range(rows):
        y = HEADER + r * (cell_h + GAP)
        cells = [(query_images[r], QUERY, query_captions[r] if query_captions else "")]
        cells += [(neighbour_images[r][j], SAME if same[r, j] else OTHER, f"{sims[r, j]:.3f}") for j in range(k)]
        for col, (thumb, colour, caption) in enumerate(cells):
            x = x_of(col)
            box = (x, y, x + cell_w - 1, y + THUMB + 2 * FRAME - 1)
            draw.rectangle(box, fill=colour)
            draw.rectangle((x + FRAME, y + FRAME, x + FRAME + THUMB - 1, y + FRAME + THUMB - 1), fill=BACKGROUND)
            t = fit_thumbnail(thumb, THUMB)  # letterboxed when not square
            img.paste(t, (x + FRAME + (THUMB - t.width) // 2, y + FRAME + (THUMB - t.height) // 2))
            draw.text((x + cell_w // 2, box[3] + 3), caption, fill=TEXT, font=small, anchor="mt")
            frames[r, col] = box
    return img, frames


def split_figure(query_set, gallery_set, query: np.ndarray, query_labels: np.ndarray,
                 gallery: np.ndarray | None = None, gallery_labels: np.ndarray | None = None,
                 count: int = FIGURE_QUERIES, k: int = FIGURE_K, seed: int = FIGURE_SEED) -> RetrievalFigure:
    """The figure of an embedded split, with the arguments xbmcore.evaluate's eval_sets and embed_split return:
    the datasets (their `image(i)` gives the thumbnails, `class_ids` the captions), then the embeddings; gallery
    None: the query set is its own gallery (each query's own copy left out)."""
    own = gallery_set is None
    if own:
        gallery_set, gallery, gallery_labels = query_set, query, query_labels
    picked = sample_queries(len(query), count, seed)
    sims, ids = nearest(query[picked], gallery, k, exclude=picked if own else None)
    same = np.asarray(gallery_labels)[ids] == np.asarray(query_labels)[picked, None]
    class_ids = getattr(query_set, "class_ids", query_labels)
    image, frames = draw_retrieval(
        [query_set.image(int(i)) for i in picked],
        [[gallery_set.image(int(j)) for j in row] for row in ids],
        sims, same, [f"class {class_ids[i]}" for i in picked],
        title=f"Top-{ids.shape[1]} of {len(picked)} fixed test queries: green = same class, red = other class")
    return RetrievalFigure(image, frames, picked, ids, sims, same)


def save_png(image: Image.Image, path: Path) -> Path:
    """Write atomically: a reader (dvc plots, MLflow) never sees half a file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


# ---- the memory view (xbmcore.memory_view): each probe anchor's hardest memory negatives, with their age ----

# Age colours, fresh to stale, one per age bin (the desktop app's Memory tab uses the same six stops).
AGE_STOPS = ((76, 201, 240), (144, 190, 109), (249, 199, 79), (248, 150, 30), (249, 65, 68), (199, 125, 255))
MEMORY_THUMB = 64  # px of a thumbnail in the memory view figure


def age_rgb(age: float, edges: Sequence[float]) -> tuple[int, int, int]:
    """The colour of an entry of this age: its bin of `edges` (the last one open) on AGE_STOPS, interpolated."""
    b = max(0, int(np.searchsorted(np.asarray(edges), age, side="right")) - 1)
    pos = b / max(len(edges) - 1, 1) * (len(AGE_STOPS) - 1)
    i = min(int(pos), len(AGE_STOPS) - 2)
    f = pos - i
    return tuple(round(a + (c - a) * f) for a, c in zip(AGE_STOPS[i], AGE_STOPS[i + 1]))


def draw_memory_view(view: dict, image_of=None) -> Image.Image:
    """One `memory_view` event as a figure: a row per anchor (its thumbnail, then its hardest memory negatives
    framed in their age's colour, similarity and age under each, * where the negative shares the anchor's
    super-class), then the age histogram of the active negatives. `image_of(index)` gives a training image
    (None: grey squares)."""
    anchors, k, edges = view["anchors"], view["k"], view["age_edges"]
    t, cap = MEMORY_THUMB, CAPTION
    cell_w, cell_h = t + 2 * FRAME, t + 2 * FRAME + cap
    hist_h = 130
    width = max(GAP + (1 + k) * (cell_w + GAP) + GAP, 640)
    height = HEADER + 18 + len(anchors) * (cell_h + GAP) + hist_h + 40
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    q = view.get("age_quantiles") or {}
    ages = "/".join("-" if q.get(n) is None else f"{q[n]:.0f}" for n in ("p10", "p50", "p90"))
    share = view.get("super_share")
    draw.text((GAP, 6), f"Memory view at step {view['step']}: {view['memory_size']} entries, "
                        f"{view['active_negatives']} active negatives, age p10/p50/p90 {ages} steps", fill=TEXT,
              font=font)
    draw.text((GAP, 24), "from the anchor's super-class (*): " + ("no super-classes" if share is None else
              f"{share:.0%} of the active negatives") + "; frame colour = age", fill=TEXT, font=small)

    def x_of(col: int) -> int:
        return GAP + col * (cell_w + GAP) + (GAP if col > 0 else 0)

    for col, text in enumerate(["anchor", *(f"#{j + 1}" for j in range(k))]):
        draw.text((x_of(col) + cell_w // 2, HEADER + 10), text, fill=TEXT, font=small, anchor="ms")
    for r, a in enumerate(anchors):
        y = HEADER + 18 + r * (cell_h + GAP)
        cells = [(a["index"], QUERY, f"class {a['label']}")]
        cells += [(n["index"], age_rgb(n["age"], edges),
                   f"{'*' if n.get('same_super') else ''}{n['sim']:.2f}  {n['age']} st") for n in a["negatives"]]
        for col, (index, colour, caption) in enumerate(cells):
            x = x_of(col)
            draw.rectangle((x, y, x + cell_w - 1, y + t + 2 * FRAME - 1), fill=colour)
            draw.rectangle((x + FRAME, y + FRAME, x + FRAME + t - 1, y + FRAME + t - 1), fill=(200, 200, 200))
            if image_of is not None:
                th = fit_thumbnail(image_of(int(index)), t)
                img.paste(th, (x + FRAME + (t - th.width) // 2, y + FRAME + (t - th.height) // 2))
            draw.text((x + cell_w // 2, y + t + 2 * FRAME + 2), caption, fill=TEXT, font=small, anchor="mt")
    # the age histogram of the active negatives: one bar per bin, in the bin's colour
    hist = np.asarray(view["age_hist"], dtype=float)
    y0 = height - 30
    bw = (width - 2 * GAP) // max(len(hist), 1)
    top = hist.max() if len(hist) and hist.max() > 0 else 1.0
    names = [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    draw.text((GAP, y0 - hist_h - 4), "ages of the active negatives (steps since written), count per bin", fill=TEXT,
              font=small)
    for b, (count, name) in enumerate(zip(hist, names)):
        x = GAP + b * bw
        h = int((hist_h - 20) * count / top)
        draw.rectangle((x + 2, y0 - h, x + bw - 3, y0), fill=age_rgb(edges[b], edges))
        draw.text((x + bw // 2, y0 + 3), name, fill=TEXT, font=small, anchor="mt")
        draw.text((x + bw // 2, y0 - h - 2), f"{int(count)}", fill=TEXT, font=small, anchor="mb")
    return img
