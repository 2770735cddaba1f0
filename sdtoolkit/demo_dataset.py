"""The bundled demo dataset: cartoon creatures with BLIP-style captions, in the pokemon-blip-captions schema.

Each picture is drawn from a handful of seeded attributes (body shape and colour, eyes, ears, tail, spots,
background) and its caption says exactly those attributes, so a model has something real to learn. The
folder is a datasets `imagefolder`: PNG files plus `metadata.jsonl` with `file_name` and `text`, loadable
with `--train_data_dir data/creatures` or `load_dataset("imagefolder", data_dir=...)` (columns `image`,
`text`). The repository ships the output; this module is how it was made:

    python -m sdtoolkit.demo_dataset --out data/creatures
"""

import argparse
import json
import os
import random

from PIL import Image, ImageDraw

COLORS = {
    "red": (214, 60, 52),
    "orange": (240, 140, 40),
    "yellow": (246, 210, 60),
    "green": (80, 170, 80),
    "blue": (60, 110, 210),
    "purple": (140, 80, 180),
    "pink": (240, 140, 180),
    "brown": (140, 95, 60),
}
BACKGROUNDS = {"white": (250, 250, 250), "light blue": (200, 225, 245), "light green": (210, 240, 210)}
BODIES = ["round", "tall", "wide"]
EARS = ["pointy ears", "round ears", "no ears"]


def draw_creature(rng, size=128):
    """Draw one creature; returns (PIL image, caption)."""
    color_name = rng.choice(list(COLORS))
    body = rng.choice(BODIES)
    ears = rng.choice(EARS)
    background = rng.choice(list(BACKGROUNDS))
    num_eyes = rng.choice([1, 2, 2, 3])
    has_tail = rng.random() < 0.5
    has_spots = rng.random() < 0.4

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    color = COLORS[color_name]
    dark = tuple(c // 2 for c in color)
    s = size / 128  # all coordinates below are for a 128 px canvas

    # Body: the bounding box depends on the body shape.
    half_w, half_h = {"round": (34, 34), "tall": (26, 44), "wide": (46, 28)}[body]
    cx, cy = 64 + rng.randint(-6, 6), 72 + rng.randint(-4, 4)
    box = [(cx - half_w) * s, (cy - half_h) * s, (cx + half_w) * s, (cy + half_h) * s]

    if has_tail:  # drawn first so the body covers its root
        tx = cx + half_w
        draw.line([tx * s, cy * s, (tx + 18) * s, (cy - 20) * s], fill=dark, width=max(1, int(6 * s)))
    top = cy - half_h
    if ears == "pointy ears":
        for ex in (cx - half_w * 0.6, cx + half_w * 0.6):
            draw.polygon(
                [((ex - 9) * s, (top + 8) * s), ((ex + 9) * s, (top + 8) * s), (ex * s, (top - 16) * s)],
                fill=color,
                outline=dark,
            )
    elif ears == "round ears":
        for ex in (cx - half_w * 0.6, cx + half_w * 0.6):
            draw.ellipse([(ex - 10) * s, (top - 10) * s, (ex + 10) * s, (top + 10) * s], fill=color, outline=dark)
    draw.ellipse(box, fill=color, outline=dark, width=max(1, int(2 * s)))

    if has_spots:
        for _ in range(5):
            px = rng.uniform(cx - half_w * 0.6, cx + half_w * 0.6)
            py = rng.uniform(cy, cy + half_h * 0.6)
            draw.ellipse([(px - 4) * s, (py - 4) * s, (px + 4) * s, (py + 4) * s], fill=dark)

    # Eyes: white with a black pupil, spread evenly across the upper half of the body.
    eye_y = cy - half_h * 0.3
    for i in range(num_eyes):
        ex = cx + (i - (num_eyes - 1) / 2) * 16
        draw.ellipse(
            [(ex - 6) * s, (eye_y - 6) * s, (ex + 6) * s, (eye_y + 6) * s], fill=(255, 255, 255), outline=(0, 0, 0)
        )
        draw.ellipse([(ex - 2.5) * s, (eye_y - 2.5) * s, (ex + 2.5) * s, (eye_y + 2.5) * s], fill=(0, 0, 0))
    draw.arc(
        [(cx - 8) * s, (cy - 2) * s, (cx + 8) * s, (cy + 10) * s], 20, 160, fill=(0, 0, 0), width=max(1, int(2 * s))
    )

    eyes = {1: "one big eye", 2: "two eyes", 3: "three eyes"}[num_eyes]
    details = [eyes, ears] if ears != "no ears" else [eyes]
    if has_tail:
        details.append("a long tail")
    if has_spots:
        details.append("dark spots")
    features = details[0] if len(details) == 1 else ", ".join(details[:-1]) + " and " + details[-1]
    caption = f"a cartoon drawing of a {body} {color_name} creature with {features} on a {background} background"
    return image, caption


def write_dataset(out, num_images=32, seed=0, size=128):
    """Write `num_images` PNGs and metadata.jsonl to `out`; the same seed gives the same files."""
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_images):
        image, caption = draw_creature(rng, size)
        file_name = f"{i:04d}.png"
        image.save(os.path.join(out, file_name), optimize=True)
        rows.append({"file_name": file_name, "text": caption})
    with open(os.path.join(out, "metadata.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Write the bundled demo dataset (an imagefolder).")
    parser.add_argument("--out", default="data/creatures")
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="Image side in pixels.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rows = write_dataset(args.out, args.num_images, args.seed, args.size)
    print(f"wrote {len(rows)} images and metadata.jsonl to {args.out}")


if __name__ == "__main__":
    main()
