"""Judge shapes-latent candidates against a baseline model by the rule of the third round, from their cards.

The rule (benchmarks/results/shapes_latent_candidates.md, "Third round", fixed before the candidates were measured),
judged with chapter 02's own rules (``companion.verdicts``) on each card's quality block (300 samples, DDIM-20, seed 1):

1. *recognisable by the judge* passes: the whole 95 % interval of the class-share distance lies below 0.15;
2. *keeps quality* does not fail: FD (features-shapes) at most 25 % worse than the bundled model's card FD
   (non-inferiority, MOVER interval); at 300 samples it cannot pass, so it only refuses a candidate shown worse.

The baseline is the bundled model unless ``--baseline`` names a model folder or a card file. The committed third-round
result was judged against the model bundled then (40,000 steps, unscaled latents), whose card is
``results/shapes_latent_candidates/installed_eps_40k.json``; to reproduce it, pass that file.

Among qualifiers the lowest upper end of the class-share interval wins.

    .venv/bin/python benchmarks/judge_latent_candidates.py F=/tmp/tF/shapes-latent G=/tmp/tG/shapes-latent \
        --baseline benchmarks/results/shapes_latent_candidates/installed_eps_40k.json [--tag third_round]

Writes benchmarks/results/shapes_latent_candidates/judged_TAG.json and prints one line per candidate.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from companion import assets  # noqa: E402
from companion.metrics import Measurement  # noqa: E402
from companion.verdicts import Rule, judge  # noqa: E402

RESULTS = HERE / "results" / "shapes_latent_candidates"
BUNDLED = "shapes-latent"


def card_measure(card: dict, key: str, name: str) -> Measurement:
    """A card's stored quality measure (value, 95 % interval, n, feature space) as a Measurement."""
    q = card.get("quality") or {}
    if key not in q:
        raise KeyError(f"card {card.get('name')!r} has no quality measure {key!r}; it has: {', '.join(q) or 'none'}")
    m = q[key]
    return Measurement(name, m["value"], m["low"], m["high"], m["n"], m["feature"])


def read_baseline(where: str | None) -> dict:
    """The baseline's card: the bundled model's (``None``), a model folder's, or a card file's."""
    if where is None:
        return assets.manifest()[BUNDLED]
    path = Path(where)
    if path.is_file():
        return json.loads(path.read_text())
    return assets.read_card(path)


def judge_cards(candidates: dict[str, dict], installed: dict) -> dict:
    """The third round's rule applied to each candidate card against the baseline (``installed``) card."""
    fd_installed = card_measure(installed, "fd_features_shapes", "FD")
    n = fd_installed.n
    recognisable = Rule("recognisable by the judge", "class-share distance (judge-shapes)", "threshold",
                        higher_is_better=False, n=n, margin=0.15)
    keeps_quality = Rule("keeps quality", "FD (features-shapes)", "non-inferiority", higher_is_better=False, n=n, margin=0.25)
    csd_installed = card_measure(installed, "judge_class_share_distance", "class-share distance")
    out = {"rule": [recognisable.describe(), keeps_quality.describe() + " (guard: must not fail)"],
           "installed": {"fd": fd_installed.as_dict(), "class_share_distance": csd_installed.as_dict(),
                         "recognisable": judge(recognisable, csd_installed).outcome},
           "candidates": {}}
    for label, card in candidates.items():
        csd = card_measure(card, "judge_class_share_distance", "class-share distance")
        fd = card_measure(card, "fd_features_shapes", "FD")
        r = judge(recognisable, csd)
        k = judge(keeps_quality, fd, fd_installed)
        out["candidates"][label] = {
            "config": card.get("config"), "training_steps": card.get("training_steps"),
            "training_seconds": card.get("training_seconds"),
            "class_share_distance": csd.as_dict(), "fd": fd.as_dict(),
            "class_shares": card["quality"]["judge_class_shares"]["generated"],
            "judge_sure": card["quality"]["judge_confident_share"]["value"],
            "recognisable": r.summary(), "keeps_quality": k.summary(), "keeps_quality_power": k.power(),
            "qualifies": r.outcome == "passes" and k.outcome != "fails"}
    qual = {lab: c for lab, c in out["candidates"].items() if c["qualifies"]}
    out["winner"] = min(qual, key=lambda lab: qual[lab]["class_share_distance"]["high"]) if qual else None
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("candidates", nargs="+", help="LABEL=FOLDER of a trained shapes-latent candidate (its card is read)")
    p.add_argument("--baseline", default=None, help="model folder or card file to judge against (default: the bundled model)")
    p.add_argument("--tag", default="third_round")
    a = p.parse_args(argv)
    cands = {}
    for item in a.candidates:
        if "=" not in item:
            raise SystemExit(f"candidate {item!r} must be LABEL=FOLDER")
        label, folder = item.split("=", 1)
        cands[label] = assets.read_card(Path(folder))
    out = judge_cards(cands, read_baseline(a.baseline))
    out["baseline"] = a.baseline or f"bundled {BUNDLED}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"judged_{a.tag}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"baseline ({out['baseline']}): recognisable", out["installed"]["recognisable"])
    for label, c in out["candidates"].items():
        print(f"{label}: recognisable {c['recognisable']} | keeps quality {c['keeps_quality']} | qualifies {c['qualifies']}")
    print("winner:", out["winner"])
    return out


if __name__ == "__main__":
    main()
