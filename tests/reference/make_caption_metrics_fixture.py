"""Writes tests/reference/caption-metrics.json: captions and pycocoevalcap's scores for them.

pycocoevalcap 1.2 (the COCO caption evaluation code): PTBTokenizer (Stanford CoreNLP 3.4.1,
needs java), BLEU-1..4 (corpus level, "closest" reference length), ROUGE-L (beta 1.2) and
CIDEr-D (n 4, sigma 6, clipping, document frequencies from these references).

Usage: PYTHONPATH=<pycocoevalcap> python3 make_caption_metrics_fixture.py [OUT]
"""
import json
import sys

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

refs = {
    "1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
          "A person on a surf board riding a wave!", "Man surfing on a big, blue wave."],
    "2": ["Two dogs playing with a frisbee in the park.", "A couple of dogs are running on the grass.",
          "Dogs chase a red frisbee; the sun is out."],
    "3": ["A kitchen with a stove, a sink and a refrigerator.", "The kitchen isn't very clean.",
          "A small kitchen has white cabinets and a black-and-white floor."],
    "4": ["A red double-decker bus driving down a city street.", "A bus on the street near tall buildings.",
          "A London bus (red) drives past a shop.", "The bus's doors are open at the stop."],
    "5": ["A plate of food with broccoli and rice.", "Someone's dinner: chicken, rice and vegetables.",
          "A white plate topped with rice, meat and broccoli."],
    "6": ["A cat sleeping on a laptop keyboard.", "A cat is lying on top of a computer.",
          "The cat doesn't want you to work -- it sleeps on the laptop."],
    "7": ["A baseball player swinging a bat at a ball.", "A batter hits the ball during a game.",
          "Players on a baseball field, one is at bat."],
    "8": ["Two giraffes standing next to each other in a field.", "Giraffes eat leaves from tall trees.",
          "A pair of giraffes in the grass near some trees."],
}
cands = {
    "1": ["A man riding a wave on top of a surfboard."],
    "2": ["Two dogs are playing with a frisbee on the grass."],
    "3": ["A kitchen with a stove and a sink."],
    "4": ["A red bus is driving down the street."],
    "5": ["A plate with rice and broccoli."],
    "6": ["A cat is sleeping on a laptop."],
    "7": ["A man holding a tennis racket."],
    "8": ["Giraffes."],
}
tok = PTBTokenizer()
gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
res = tok.tokenize({k: [{"caption": c} for c in v] for k, v in cands.items()})
bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
rouge, rouge_per = Rouge().compute_score(gts, res)
cider, cider_per = Cider().compute_score(gts, res)
out = {
    "references": refs, "candidates": {k: v[0] for k, v in cands.items()},
    "tokenized_references": gts, "tokenized_candidates": {k: v[0] for k, v in res.items()},
    "bleu": bleu, "bleu_per_image": [list(map(float, b)) for b in bleu_per],
    "rouge_l": float(rouge), "rouge_l_per_image": [float(x) for x in rouge_per],
    "cider_d": float(cider), "cider_d_per_image": [float(x) for x in cider_per],
}
path = sys.argv[1] if len(sys.argv) > 1 else "tests/reference/caption-metrics.json"
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print(f"wrote {path}: BLEU {bleu}, ROUGE-L {rouge}, CIDEr-D {cider}")
