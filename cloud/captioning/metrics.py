"""Caption scores with pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr), as the COCO caption
evaluation and ruotianluo's ``eval_utils.language_eval`` compute them. SPICE is left out: it
downloads models at first use and fails offline."""

from __future__ import annotations

import contextlib
import logging
import sys

logger = logging.getLogger(__name__)
METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def bleu4(references: list[list[str]], hypotheses: list[str]) -> float:
    """Corpus BLEU-4 of already tokenised, lower-cased captions (space-separated words).

    Uses pycocoevalcap's Bleu (pure Python, no Java), for model selection during training.
    """
    from pycocoevalcap.bleu.bleu import Bleu

    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [hyp] for i, hyp in enumerate(hypotheses)}
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(score[3])


def coco_scores(references: list[list[str]], hypotheses: list[str],
                tokenize: bool = True) -> dict[str, float]:
    """All seven scores; raw captions go through pycocoevalcap's PTBTokenizer (needs Java).

    Returns a dict with keys Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr. Raises RuntimeError when
    Java is missing (PTBTokenizer and METEOR need it).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts: dict[int, list[str]] = {i: list(refs) for i, refs in enumerate(references)}
    res: dict[int, list[str]] = {i: [h] for i, h in enumerate(hypotheses)}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # pycocoevalcap prints progress on stdout
            if tokenize:
                tokenizer = PTBTokenizer()
                gts = tokenizer.tokenize({i: [{"caption": c} for c in v] for i, v in gts.items()})
                res = tokenizer.tokenize({i: [{"caption": c} for c in v] for i, v in res.items()})
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores = {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
            scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
            scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
            scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    except FileNotFoundError as err:
        raise RuntimeError(f"pycocoevalcap needs Java for PTBTokenizer and METEOR: {err}") from err
    return scores
