"""The best retrieval R@1 any model could reach on a sample_data split: how much of the gap
between the demo's R@1 and 100 is the data's own ambiguity.

A caption template is a complete description at its level of detail ("a photo of a red circle"
is written only for a scene whose one object is a red circle), so a caption is true of exactly
the scenes among whose seven templates (``make_sample_data.caption_templates``) it appears.
An oracle that knows this:
- text -> image: ranks the images a caption is true of first, in random order: R@1 is the mean
  over captions of 1 / (images it is true of);
- image -> text: ranks first the true captions that are true of the fewest images, in random
  order among them: a hit when the caption drawn was written for this image.

    python scripts/retrieval_ceiling.py [val|test]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_data import SceneObject, caption_templates

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"


def scene_templates(split: str) -> dict[str, set[str]]:
    """Every caption each image of the split could have been given, by image path."""
    scenes = json.loads((SAMPLE_DATA / f"scenes_{split}.json").read_text())
    return {
        scene["image"]: set(
            caption_templates([SceneObject(**obj) for obj in scene["objects"]], scene["background"])
        )
        for scene in scenes
    }


def ceilings(split: str) -> dict[str, float]:
    templates = scene_templates(split)
    entries = json.loads((SAMPLE_DATA / f"karpathy_{split}.json").read_text())
    captions = [(text, entry["image"]) for entry in entries for text in entry["caption"]]
    true_of: dict[str, list[str]] = defaultdict(list)  # caption -> images it is true of
    for image, texts in templates.items():
        for text in texts:
            true_of[text].append(image)
    for text, image in captions:
        if image not in true_of[text]:
            raise SystemExit(f"karpathy_{split}.json: {text!r} is not a template of {image}")
    text_to_image = sum(1 / len(true_of[text]) for text, _ in captions) / len(captions)
    image_hits = 0.0
    for image in templates:
        candidates = [(len(true_of[t]), own) for t, own in captions if image in true_of[t]]
        fewest = min(count for count, _ in candidates)
        drawn = [own for count, own in candidates if count == fewest]
        image_hits += sum(own == image for own in drawn) / len(drawn)
    ambiguous = sum(len(true_of[text]) > 1 for text, _ in captions) / len(captions)
    return {
        "captions": len(captions),
        "images": len(templates),
        "captions_true_of_several_images_percent": round(100 * ambiguous, 2),
        "text_to_image_R@1_ceiling": round(100 * text_to_image, 2),
        "image_to_text_R@1_ceiling": round(100 * image_hits / len(templates), 2),
    }


if __name__ == "__main__":
    print(json.dumps(ceilings(sys.argv[1] if len(sys.argv) > 1 else "val"), indent=1))
